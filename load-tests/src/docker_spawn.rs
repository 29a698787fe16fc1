//! `docker-spawn`: spawn-to-connected time of the Docker provider next to plain `docker run` of
//! the same image, measured side by side (alternating) in one process.
//!
//! - Provider: `POST /v1/runs` on a server with a Docker provider, until the shim has connected
//!   (the run's `running` time stamp minus its creation stamp, both taken by the server).
//! - Plain: `docker run -d --rm` of the same image with busybox `nc` dialling a TCP listener of
//!   this process through the bridge gateway, until the listener accepts.
//!
//! Needs the Docker engine and `codebolt/agent-base:latest` (`deploy/build-images.sh`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use actors::model::RunState;
use anyhow::{bail, Context};
use clap::Args;

use crate::fixture::{Api, InProcessServer, Workspace};
use crate::stats::{summary_cells, table, Latencies};

const IMAGE: &str = "codebolt/agent-base:latest";

#[derive(Debug, Args)]
pub struct DockerSpawnArgs {
    /// Runs of each kind.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Runs of each kind done first and not counted (image and page caches).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
}

/// The server in its own actix system on its own thread, with a Docker provider.
fn start_server(workspace: PathBuf) -> anyhow::Result<InProcessServer> {
    let config_dir = tempfile::Builder::new()
        .prefix("codebolt-docker-bench-")
        .tempdir()?;
    let cluster = format!("bench-{}", std::process::id());
    let yaml = format!(
        "providers:\n  docker:\n    kind: docker\n    default_image: {IMAGE}\n\
             cluster_id: {cluster}\nsandbox_listen: 0.0.0.0:0\n"
    );
    let config = config_dir.path().join("codebolt.yaml");
    std::fs::write(&config, yaml)?;
    let options = codebolt::server::ServerOptions {
        listen: Some("127.0.0.1:0".into()),
        config: Some(config),
        workspace: Some(workspace),
        run_timeouts: Some(crate::fixture::load_timeouts()),
        workers: Some(1),
        ..Default::default()
    };
    InProcessServer::launch(options, vec![config_dir])
}

async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .context("running the docker CLI")?;
    if !out.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The default bridge's gateway: its configured gateway, else its subnet's first address.
async fn bridge_gateway() -> anyhow::Result<String> {
    let raw = docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{json .IPAM.Config}}",
    ])
    .await?;
    let configs: Vec<serde_json::Value> = serde_json::from_str(&raw)?;
    for c in configs {
        if let Some(gw) = c["Gateway"].as_str().filter(|g| !g.is_empty()) {
            return Ok(gw.to_string());
        }
        if let Some((addr, len)) = c["Subnet"].as_str().and_then(|s| s.split_once('/')) {
            if let (Ok(addr), Ok(len)) = (addr.parse::<std::net::Ipv4Addr>(), len.parse::<u32>()) {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                return Ok(std::net::Ipv4Addr::from((u32::from(addr) & mask) + 1).to_string());
            }
        }
    }
    bail!("the bridge network has no IPv4 gateway")
}

/// One provider run: creation to shim connected, by the server's time stamps.
async fn provider_once(api: &Api) -> anyhow::Result<Duration> {
    let created = api
        .create(serde_json::json!({"agent": "quick", "task": "t", "execution": "docker"}))
        .await?;
    let id = created.id.to_string();
    let done = api.wait_end(&id).await?;
    if done.state != RunState::Succeeded {
        let events = api
            .http
            .get(format!("{}/v1/runs/{id}/events", api.base))
            .send()
            .await?
            .text()
            .await?;
        let logs = api
            .http
            .get(format!("{}/v1/runs/{id}/logs?source=provider", api.base))
            .send()
            .await?
            .text()
            .await?;
        bail!(
            "run {id} ended {} ({:?})\nevents:\n{events}\nprovider log:\n{logs}",
            done.state,
            done.failure
        );
    }
    let running = done
        .state_times
        .get(&RunState::Running)
        .context("no running time stamp")?;
    let ms = (*running - done.created_at).num_microseconds().unwrap_or(0);
    Ok(Duration::from_micros(u64::try_from(ms).unwrap_or(0)))
}

/// One plain `docker run`: start of the command to the container's connection being accepted.
async fn plain_once(gateway: &str, listener: &tokio::net::TcpListener) -> anyhow::Result<Duration> {
    let port = listener.local_addr()?.port().to_string();
    let started = Instant::now();
    let argv = [
        "run",
        "-d",
        "--rm",
        "--entrypoint",
        "nc",
        IMAGE,
        gateway,
        &port,
    ];
    let run = docker(&argv);
    let accept = async {
        let (stream, _) = listener.accept().await?;
        let at = started.elapsed();
        drop(stream);
        anyhow::Ok(at)
    };
    let (run, at) = tokio::join!(run, tokio::time::timeout(Duration::from_secs(60), accept));
    run?;
    at.context("the container did not connect within 60 s")?
}

pub async fn run(args: DockerSpawnArgs) -> anyhow::Result<()> {
    docker(&["image", "inspect", IMAGE])
        .await
        .context("codebolt/agent-base:latest is missing: run deploy/build-images.sh")?;
    let workspace = Workspace::new(64)?;
    workspace.agent("quick", "read task; exit 0")?;
    let server = start_server(workspace.path().to_path_buf())?;
    let api = Api::new(&server.base_url)?;
    let gateway = bridge_gateway().await?;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;

    let mut provider = Latencies::default();
    let mut plain = Latencies::default();
    let mut provider_ms = Vec::new();
    let mut plain_ms = Vec::new();
    for i in 0..args.warmup + args.runs {
        // Alternate which goes first, so both see the same machine.
        let (p, q) = if i % 2 == 0 {
            let p = provider_once(&api).await?;
            (p, plain_once(&gateway, &listener).await?)
        } else {
            let q = plain_once(&gateway, &listener).await?;
            (provider_once(&api).await?, q)
        };
        if i >= args.warmup {
            provider.record(p);
            plain.record(q);
            provider_ms.push(p.as_secs_f64() * 1e3);
            plain_ms.push(q.as_secs_f64() * 1e3);
        }
    }
    server.shutdown()?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            0.0
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let (pm, qm) = (median(&mut provider_ms), median(&mut plain_ms));
    let mut provider_row = vec!["docker provider: create → shim connected".to_string()];
    provider_row.extend(summary_cells(&provider.summary()));
    let mut plain_row = vec!["plain docker run -d: start → connected".to_string()];
    plain_row.extend(summary_cells(&plain.summary()));
    println!(
        "{}",
        table(
            &[
                "spawn-to-connected",
                "runs",
                "p50",
                "p90",
                "p99",
                "max",
                "mean"
            ],
            &[provider_row, plain_row],
        )
    );
    let overhead = if qm > 0.0 {
        (pm / qm - 1.0) * 100.0
    } else {
        0.0
    };
    println!(
        "median: provider {pm:.1} ms, plain {qm:.1} ms, provider adds {overhead:+.1} % (target ≤ 15 %)"
    );
    Ok(())
}
