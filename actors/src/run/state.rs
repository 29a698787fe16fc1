//! The run lifecycle (SPEC §5) as a pure function: `transition(phase, input) -> (phase, actions)`.
//! The run actor feeds it what happened and carries out the actions it returns.

use crate::model::{Failure, FailureKind, RunState, Termination};

/// The timers a run arms. Each has its own terminal reason; none is reset implicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// From creation until the shim connects.
    Startup,
    /// Time without agent activity while running.
    Idle,
    /// Absolute time to live of the run.
    Ttl,
    /// Grace period of a stop before the sandbox is killed.
    Grace,
    /// How long a disconnected shim may take to come back.
    Reconnect,
}

/// Why a run is in `stopping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A user asked to stop.
    Stop { grace_s: u64 },
    /// A timeout ends the run; it fails with this kind.
    Timeout { kind: FailureKind, grace_s: u64 },
}

impl Ending {
    pub fn grace_s(self) -> u64 {
        match self {
            Ending::Stop { grace_s } | Ending::Timeout { grace_s, .. } => grace_s,
        }
    }
}

/// What the run actor tells the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Start,
    /// This replica took the run over from another (which stopped or lost the lease): the phase
    /// was rebuilt from the stored record and nothing is connected yet.
    Adopted,
    Spawned,
    SpawnFailed(Failure),
    ShimConnected,
    ShimDisconnected,
    AgentExited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The provider saw the sandbox end.
    SandboxExited {
        code: Option<i32>,
        oom_killed: bool,
    },
    Stop {
        grace_s: u64,
    },
    Kill,
    TimerFired(Timer),
    /// The shim broke the protocol beyond repair.
    ProtocolViolation(String),
}

/// What the run actor must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Spawn,
    Arm(Timer),
    Cancel(Timer),
    /// Send `stop{grace_s}` to the shim.
    SendStop {
        grace_s: u64,
    },
    /// Ask the provider to kill and remove the sandbox (also after a normal exit: cleanup).
    KillSandbox,
    /// The run reached a terminal state: persist, revoke the token, release resources.
    Finish,
}

/// The part of a run the lifecycle depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub state: RunState,
    pub ending: Option<Ending>,
    /// The provider created the sandbox (and it was not yet cleaned up).
    pub sandbox: bool,
    pub connected: bool,
    pub exit_code: Option<i32>,
    pub failure: Option<Failure>,
    pub termination: Option<Termination>,
}

impl Default for Phase {
    fn default() -> Self {
        Phase {
            state: RunState::Pending,
            ending: None,
            sandbox: false,
            connected: false,
            exit_code: None,
            failure: None,
            termination: None,
        }
    }
}

/// Settings the machine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub has_ttl: bool,
    /// Grace given to the agent when a timeout ends the run.
    pub timeout_grace_s: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub phase: Phase,
    pub actions: Vec<Action>,
}

/// Timers that may be armed in a live run; all are cancelled when it finishes.
const ALL_TIMERS: [Timer; 5] = [
    Timer::Startup,
    Timer::Idle,
    Timer::Ttl,
    Timer::Grace,
    Timer::Reconnect,
];

fn finish(
    mut phase: Phase,
    state: RunState,
    termination: Termination,
    failure: Option<Failure>,
    mut actions: Vec<Action>,
) -> Outcome {
    if phase.sandbox {
        actions.push(Action::KillSandbox);
        phase.sandbox = false;
    }
    actions.extend(ALL_TIMERS.iter().map(|t| Action::Cancel(*t)));
    actions.push(Action::Finish);
    phase.state = state;
    phase.termination = Some(termination);
    phase.failure = failure;
    phase.connected = false;
    Outcome { phase, actions }
}

fn fail(phase: Phase, kind: FailureKind, message: impl Into<String>) -> Outcome {
    finish(
        phase,
        RunState::Failed,
        Termination::Failed,
        Some(Failure::new(kind, message)),
        vec![],
    )
}

fn stay(phase: Phase, actions: Vec<Action>) -> Outcome {
    Outcome { phase, actions }
}

/// Begin stopping a running run: tell the shim, give it the grace period.
fn begin_stop(mut phase: Phase, ending: Ending) -> Outcome {
    phase.state = RunState::Stopping;
    phase.ending = Some(ending);
    let mut actions = vec![Action::Cancel(Timer::Idle), Action::Arm(Timer::Grace)];
    if phase.connected {
        actions.push(Action::SendStop {
            grace_s: ending.grace_s(),
        });
    }
    stay(phase, actions)
}

/// The end of a run whose agent (or sandbox) is gone, in the light of why it was stopping.
fn ended_while_stopping(phase: Phase, ending: Ending, exit_code: Option<i32>) -> Outcome {
    match ending {
        Ending::Stop { .. } => finish(
            phase,
            RunState::Stopped,
            Termination::StoppedGracefully,
            None,
            vec![],
        ),
        Ending::Timeout { kind, .. } => fail(
            phase,
            kind,
            match exit_code {
                Some(code) => format!("{kind} (agent exited with code {code} after the stop)"),
                None => kind.to_string(),
            },
        ),
    }
}

/// The agent-shim's exit code when it could not reach the control plane for `lost_after`.
const SHIM_EXIT_UNREACHABLE: i32 = 3;

pub fn transition(phase: &Phase, input: Input, limits: Limits) -> Outcome {
    use RunState::*;
    let p = phase.clone();
    if p.state.is_terminal() {
        // A sandbox created after the run ended (kill during provisioning) is removed at once.
        return match input {
            Input::Spawned => stay(p, vec![Action::KillSandbox]),
            _ => stay(p, vec![]),
        };
    }
    match (p.state, input) {
        (Pending, Input::Start) => {
            let mut actions = vec![Action::Spawn, Action::Arm(Timer::Startup)];
            if limits.has_ttl {
                actions.push(Action::Arm(Timer::Ttl));
            }
            let mut p = p;
            p.state = Provisioning;
            stay(p, actions)
        }
        (Pending, Input::Adopted) => transition(&p, Input::Start, limits),
        (Provisioning | Starting | Running | Stopping, Input::Adopted) => {
            let mut p = p;
            p.connected = false;
            let mut actions = match p.state {
                Provisioning | Starting => vec![Action::Arm(Timer::Startup)],
                Running => vec![Action::Arm(Timer::Reconnect), Action::Arm(Timer::Idle)],
                _ => vec![Action::Arm(Timer::Reconnect), Action::Arm(Timer::Grace)],
            };
            if limits.has_ttl {
                actions.push(Action::Arm(Timer::Ttl));
            }
            stay(p, actions)
        }
        (Provisioning, Input::Spawned) => {
            let mut p = p;
            p.sandbox = true;
            p.state = Starting;
            stay(p, vec![])
        }
        (Provisioning, Input::ShimConnected) => {
            // The shim called back before the provider's spawn call returned: the run is
            // running; the sandbox handle follows with `Spawned`.
            let mut p = p;
            p.connected = true;
            p.state = Running;
            stay(
                p,
                vec![Action::Cancel(Timer::Startup), Action::Arm(Timer::Idle)],
            )
        }
        (Running, Input::Spawned) => {
            let mut p = p;
            p.sandbox = true;
            stay(p, vec![])
        }
        (Stopping, Input::Spawned) if p.connected => {
            // A graceful stop is under way with the shim; keep the handle for the kill.
            let mut p = p;
            p.sandbox = true;
            stay(p, vec![])
        }
        (Stopping, Input::Spawned) => {
            // Stopped while provisioning: the sandbox is not wanted any more.
            let mut p = p;
            p.sandbox = true;
            finish(p, Stopped, Termination::StoppedGracefully, None, vec![])
        }
        (Provisioning | Stopping, Input::SpawnFailed(failure)) if !p.sandbox => match p.ending {
            Some(Ending::Stop { .. }) => {
                finish(p, Stopped, Termination::StoppedGracefully, None, vec![])
            }
            _ => finish(p, Failed, Termination::Failed, Some(failure), vec![]),
        },
        (Starting, Input::ShimConnected) => {
            let mut p = p;
            p.state = Running;
            p.connected = true;
            stay(
                p,
                vec![Action::Cancel(Timer::Startup), Action::Arm(Timer::Idle)],
            )
        }
        (Running, Input::ShimConnected) => {
            let mut p = p;
            p.connected = true;
            stay(p, vec![Action::Cancel(Timer::Reconnect)])
        }
        (Stopping, Input::ShimConnected) if p.sandbox => {
            let mut p = p;
            p.connected = true;
            let grace_s = p.ending.map_or(0, Ending::grace_s);
            stay(
                p,
                vec![
                    Action::Cancel(Timer::Reconnect),
                    Action::SendStop { grace_s },
                ],
            )
        }
        (Running | Stopping, Input::ShimDisconnected) if p.connected => {
            let mut p = p;
            p.connected = false;
            stay(p, vec![Action::Arm(Timer::Reconnect)])
        }
        (Running, Input::AgentExited { code, signal }) => {
            let mut p = p;
            p.exit_code = code;
            if code == Some(0) {
                finish(p, Succeeded, Termination::Exited, None, vec![])
            } else {
                let how = match (code, signal) {
                    (Some(c), _) => format!("agent exited with code {c}"),
                    (None, Some(s)) => format!("agent was killed by signal {s}"),
                    (None, None) => "agent exited without a code".to_string(),
                };
                fail(p, FailureKind::AgentError, how)
            }
        }
        (Stopping, Input::AgentExited { code, .. }) => {
            let mut p = p;
            p.exit_code = code;
            match p.ending {
                Some(ending) => ended_while_stopping(p, ending, code),
                None => fail(p, FailureKind::AgentError, "agent exited while stopping"),
            }
        }
        (
            Provisioning | Starting | Running | Stopping,
            Input::SandboxExited { code, oom_killed },
        ) => {
            // The sandbox stays marked, so finishing removes what is left of it.
            let code_text =
                code.map_or_else(|| "no exit code".to_string(), |c| format!("exit code {c}"));
            if oom_killed {
                return fail(
                    p,
                    FailureKind::ResourceExhausted,
                    format!("sandbox was killed for exceeding its memory limit ({code_text})"),
                );
            }
            match (p.state, p.ending) {
                (Stopping, Some(ending)) => ended_while_stopping(p, ending, code),
                (Starting | Provisioning, _) if code == Some(SHIM_EXIT_UNREACHABLE) => fail(
                    p,
                    FailureKind::UnreachableCallback,
                    format!(
                        "the sandbox's shim gave up reaching the control plane and exited ({code_text})"
                    ),
                ),
                (Starting | Provisioning, _) => fail(
                    p,
                    FailureKind::ProviderError,
                    format!("sandbox exited before the shim connected ({code_text})"),
                ),
                _ => fail(
                    p,
                    FailureKind::SandboxVanished,
                    format!("sandbox ended without the agent's exit being reported ({code_text})"),
                ),
            }
        }
        (Provisioning, Input::Stop { grace_s }) => {
            // The spawn is in flight: wait for it, then remove the sandbox.
            let mut p = p;
            p.state = Stopping;
            p.ending = Some(Ending::Stop { grace_s });
            stay(p, vec![])
        }
        (Starting, Input::Stop { .. }) => {
            finish(p, Stopped, Termination::StoppedGracefully, None, vec![])
        }
        (Running, Input::Stop { grace_s }) => begin_stop(p, Ending::Stop { grace_s }),
        (Stopping, Input::Stop { .. }) => stay(p, vec![]),
        (_, Input::Kill) => finish(p, Killed, Termination::Killed, None, vec![]),
        (Provisioning, Input::TimerFired(Timer::Startup)) => fail(
            p,
            FailureKind::StartupTimeout,
            "the sandbox was not created within the startup timeout",
        ),
        (Starting, Input::TimerFired(Timer::Startup)) => fail(
            p,
            FailureKind::UnreachableCallback,
            "the sandbox started but the shim did not connect within the startup timeout",
        ),
        (Running, Input::TimerFired(Timer::Idle)) => begin_stop(
            p,
            Ending::Timeout {
                kind: FailureKind::IdleTimeout,
                grace_s: limits.timeout_grace_s,
            },
        ),
        (Running, Input::TimerFired(Timer::Ttl)) => begin_stop(
            p,
            Ending::Timeout {
                kind: FailureKind::RunTimeout,
                grace_s: limits.timeout_grace_s,
            },
        ),
        (Provisioning | Starting, Input::TimerFired(Timer::Ttl)) => fail(
            p,
            FailureKind::RunTimeout,
            "the run reached its time to live before the agent started",
        ),
        (Stopping, Input::TimerFired(Timer::Grace)) => match p.ending {
            Some(Ending::Timeout { kind, .. }) => fail(
                p,
                kind,
                format!("{kind}; the agent did not exit within the grace period and was killed"),
            ),
            Some(Ending::Stop { .. }) | None => {
                finish(p, Killed, Termination::KilledAfterGrace, None, vec![])
            }
        },
        (Running | Stopping, Input::TimerFired(Timer::Reconnect)) if !p.connected => fail(
            p,
            FailureKind::ConnectionLost,
            "the shim disconnected and did not reconnect in time",
        ),
        (_, Input::ProtocolViolation(message)) => fail(p, FailureKind::ProtocolError, message),
        // Anything else (a stale timer, a duplicate notice) changes nothing.
        (_, _) => stay(p, vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adopted_run_waits_for_its_shim_under_its_own_timers() {
        let limits = Limits {
            has_ttl: true,
            timeout_grace_s: 5,
        };
        let running = Phase {
            state: RunState::Running,
            sandbox: true,
            connected: true,
            ..Phase::default()
        };
        let out = transition(&running, Input::Adopted, limits);
        assert_eq!(out.phase.state, RunState::Running);
        assert!(
            !out.phase.connected,
            "nothing is connected to the adopter yet"
        );
        assert_eq!(
            out.actions,
            vec![
                Action::Arm(Timer::Reconnect),
                Action::Arm(Timer::Idle),
                Action::Arm(Timer::Ttl)
            ]
        );
        // No shim comes back: connection_lost, and the sandbox is removed.
        let lost = transition(&out.phase, Input::TimerFired(Timer::Reconnect), limits);
        assert_eq!(lost.phase.state, RunState::Failed);
        assert_eq!(
            lost.phase.failure.map(|f| f.kind),
            Some(FailureKind::ConnectionLost)
        );
        assert!(lost.actions.contains(&Action::KillSandbox));
        // The shim reconnects to the adopter: running again.
        let back = transition(&out.phase, Input::ShimConnected, limits);
        assert!(back.phase.connected);
        assert_eq!(back.actions, vec![Action::Cancel(Timer::Reconnect)]);

        let starting = Phase {
            state: RunState::Starting,
            sandbox: true,
            ..Phase::default()
        };
        let out = transition(
            &starting,
            Input::Adopted,
            Limits {
                has_ttl: false,
                ..limits
            },
        );
        assert_eq!(out.actions, vec![Action::Arm(Timer::Startup)]);
        let stopping = Phase {
            state: RunState::Stopping,
            ending: Some(Ending::Stop { grace_s: 3 }),
            sandbox: true,
            ..Phase::default()
        };
        let out = transition(
            &stopping,
            Input::Adopted,
            Limits {
                has_ttl: false,
                ..limits
            },
        );
        assert_eq!(
            out.actions,
            vec![Action::Arm(Timer::Reconnect), Action::Arm(Timer::Grace)]
        );
        let pending = transition(&Phase::default(), Input::Adopted, limits);
        assert_eq!(pending.phase.state, RunState::Provisioning);
        assert!(
            pending.actions.contains(&Action::Spawn),
            "a run never spawned is spawned"
        );
    }

    const LIMITS: Limits = Limits {
        has_ttl: true,
        timeout_grace_s: 5,
    };

    fn run(inputs: Vec<Input>) -> (Phase, Vec<Action>) {
        let mut phase = Phase::default();
        let mut last = vec![];
        for input in inputs {
            let out = transition(&phase, input, LIMITS);
            phase = out.phase;
            last = out.actions;
        }
        (phase, last)
    }

    fn running() -> Vec<Input> {
        vec![Input::Start, Input::Spawned, Input::ShimConnected]
    }

    fn with(mut base: Vec<Input>, more: impl IntoIterator<Item = Input>) -> Vec<Input> {
        base.extend(more);
        base
    }

    #[test]
    fn start_spawns_and_arms_startup_and_ttl() {
        let (p, actions) = run(vec![Input::Start]);
        assert_eq!(p.state, RunState::Provisioning);
        assert_eq!(
            actions,
            vec![
                Action::Spawn,
                Action::Arm(Timer::Startup),
                Action::Arm(Timer::Ttl)
            ]
        );
        let out = transition(
            &Phase::default(),
            Input::Start,
            Limits {
                has_ttl: false,
                timeout_grace_s: 1,
            },
        );
        assert!(!out.actions.contains(&Action::Arm(Timer::Ttl)));
    }

    #[test]
    fn happy_path_succeeds_and_cleans_up() {
        let (p, actions) = run(with(
            running(),
            [Input::AgentExited {
                code: Some(0),
                signal: None,
            }],
        ));
        assert_eq!(p.state, RunState::Succeeded);
        assert_eq!(p.termination, Some(Termination::Exited));
        assert_eq!(p.exit_code, Some(0));
        assert!(actions.contains(&Action::KillSandbox));
        assert_eq!(actions.last(), Some(&Action::Finish));
    }

    #[test]
    fn connect_cancels_startup_and_arms_idle() {
        let (p, actions) = run(running());
        assert_eq!(p.state, RunState::Running);
        assert_eq!(
            actions,
            vec![Action::Cancel(Timer::Startup), Action::Arm(Timer::Idle)]
        );
    }

    #[test]
    fn non_zero_exit_is_agent_error() {
        let (p, _) = run(with(
            running(),
            [Input::AgentExited {
                code: Some(7),
                signal: None,
            }],
        ));
        assert_eq!(p.state, RunState::Failed);
        let f = p.failure.unwrap();
        assert_eq!(f.kind, FailureKind::AgentError);
        assert!(f.message.contains('7'));
        assert_eq!(p.exit_code, Some(7));
    }

    #[test]
    fn graceful_stop_ends_stopped() {
        let (p, actions) = run(with(running(), [Input::Stop { grace_s: 3 }]));
        assert_eq!(p.state, RunState::Stopping);
        assert!(actions.contains(&Action::SendStop { grace_s: 3 }));
        assert!(actions.contains(&Action::Arm(Timer::Grace)));
        let (p, _) = run(with(
            running(),
            [
                Input::Stop { grace_s: 3 },
                Input::AgentExited {
                    code: Some(143),
                    signal: None,
                },
            ],
        ));
        assert_eq!(p.state, RunState::Stopped);
        assert_eq!(p.termination, Some(Termination::StoppedGracefully));
        assert!(p.failure.is_none());
    }

    #[test]
    fn stop_past_grace_is_killed_after_grace() {
        let (p, actions) = run(with(
            running(),
            [Input::Stop { grace_s: 1 }, Input::TimerFired(Timer::Grace)],
        ));
        assert_eq!(p.state, RunState::Killed);
        assert_eq!(p.termination, Some(Termination::KilledAfterGrace));
        assert!(actions.contains(&Action::KillSandbox));
    }

    #[test]
    fn kill_is_immediate_from_any_live_state() {
        for prefix in [
            vec![Input::Start],
            vec![Input::Start, Input::Spawned],
            running(),
            with(running(), [Input::Stop { grace_s: 9 }]),
        ] {
            let (p, actions) = run(with(prefix, [Input::Kill]));
            assert_eq!(p.state, RunState::Killed);
            assert_eq!(p.termination, Some(Termination::Killed));
            assert_eq!(actions.last(), Some(&Action::Finish));
        }
    }

    #[test]
    fn kill_during_provisioning_removes_the_late_sandbox() {
        let (p, actions) = run(vec![Input::Start, Input::Kill, Input::Spawned]);
        assert_eq!(p.state, RunState::Killed);
        assert_eq!(actions, vec![Action::KillSandbox]);
    }

    #[test]
    fn stop_and_kill_after_the_end_change_nothing() {
        let done = with(
            running(),
            [Input::AgentExited {
                code: Some(0),
                signal: None,
            }],
        );
        let (before, _) = run(done.clone());
        for extra in [Input::Stop { grace_s: 1 }, Input::Kill] {
            let (p, actions) = run(with(done.clone(), [extra]));
            assert_eq!(p, before);
            assert!(actions.is_empty());
        }
    }

    #[test]
    fn startup_timeout_depends_on_whether_the_sandbox_exists() {
        let (p, _) = run(vec![Input::Start, Input::TimerFired(Timer::Startup)]);
        assert_eq!(p.failure.unwrap().kind, FailureKind::StartupTimeout);
        let (p, actions) = run(vec![
            Input::Start,
            Input::Spawned,
            Input::TimerFired(Timer::Startup),
        ]);
        let failure = p.failure.unwrap();
        assert_eq!(failure.kind, FailureKind::UnreachableCallback);
        assert!(failure.hint.contains("callback URL"));
        assert!(actions.contains(&Action::KillSandbox));
    }

    #[test]
    fn stale_startup_timer_after_connect_is_ignored() {
        let (p, actions) = run(with(running(), [Input::TimerFired(Timer::Startup)]));
        assert_eq!(p.state, RunState::Running);
        assert!(actions.is_empty());
    }

    #[test]
    fn idle_and_ttl_stop_gracefully_then_fail_with_their_own_kind() {
        for (timer, kind) in [
            (Timer::Idle, FailureKind::IdleTimeout),
            (Timer::Ttl, FailureKind::RunTimeout),
        ] {
            let (p, actions) = run(with(running(), [Input::TimerFired(timer)]));
            assert_eq!(p.state, RunState::Stopping);
            assert!(actions.contains(&Action::SendStop { grace_s: 5 }));
            let (p, _) = run(with(
                running(),
                [
                    Input::TimerFired(timer),
                    Input::AgentExited {
                        code: Some(143),
                        signal: None,
                    },
                ],
            ));
            assert_eq!(p.state, RunState::Failed);
            assert_eq!(p.failure.unwrap().kind, kind);
            let (p, _) = run(with(
                running(),
                [Input::TimerFired(timer), Input::TimerFired(Timer::Grace)],
            ));
            assert_eq!(p.failure.unwrap().kind, kind);
        }
    }

    #[test]
    fn disconnect_arms_reconnect_and_lost_shim_fails_connection_lost() {
        let (p, actions) = run(with(running(), [Input::ShimDisconnected]));
        assert_eq!(actions, vec![Action::Arm(Timer::Reconnect)]);
        assert!(!p.connected);
        let (p, actions) = run(with(
            running(),
            [Input::ShimDisconnected, Input::ShimConnected],
        ));
        assert_eq!(actions, vec![Action::Cancel(Timer::Reconnect)]);
        assert_eq!(p.state, RunState::Running);
        let (p, _) = run(with(
            running(),
            [Input::ShimDisconnected, Input::TimerFired(Timer::Reconnect)],
        ));
        assert_eq!(p.failure.unwrap().kind, FailureKind::ConnectionLost);
    }

    #[test]
    fn reconnect_while_stopping_resends_stop() {
        let (_, actions) = run(with(
            running(),
            [
                Input::Stop { grace_s: 4 },
                Input::ShimDisconnected,
                Input::ShimConnected,
            ],
        ));
        assert!(actions.contains(&Action::SendStop { grace_s: 4 }));
    }

    #[test]
    fn sandbox_exit_is_classified() {
        let (p, _) = run(with(
            running(),
            [Input::SandboxExited {
                code: Some(137),
                oom_killed: true,
            }],
        ));
        assert_eq!(p.failure.unwrap().kind, FailureKind::ResourceExhausted);
        let (p, _) = run(vec![
            Input::Start,
            Input::Spawned,
            Input::SandboxExited {
                code: Some(2),
                oom_killed: false,
            },
        ]);
        assert_eq!(p.failure.unwrap().kind, FailureKind::ProviderError);
        let (p, _) = run(vec![
            Input::Start,
            Input::Spawned,
            Input::SandboxExited {
                code: Some(3),
                oom_killed: false,
            },
        ]);
        assert_eq!(p.failure.unwrap().kind, FailureKind::UnreachableCallback);
        let (p, actions) = run(with(
            running(),
            [Input::SandboxExited {
                code: None,
                oom_killed: false,
            }],
        ));
        assert_eq!(p.failure.unwrap().kind, FailureKind::SandboxVanished);
        assert!(
            actions.contains(&Action::KillSandbox),
            "what is left is removed"
        );
    }

    #[test]
    fn stop_during_provisioning_removes_the_sandbox_when_it_arrives() {
        let (p, actions) = run(vec![
            Input::Start,
            Input::Stop { grace_s: 2 },
            Input::Spawned,
        ]);
        assert_eq!(p.state, RunState::Stopped);
        assert!(actions.contains(&Action::KillSandbox));
    }

    #[test]
    fn a_shim_connecting_before_the_spawn_call_returns_is_running_at_once() {
        let (p, actions) = run(vec![Input::Start, Input::ShimConnected]);
        assert_eq!(p.state, RunState::Running);
        assert!(p.connected && !p.sandbox);
        assert_eq!(
            actions,
            vec![Action::Cancel(Timer::Startup), Action::Arm(Timer::Idle)]
        );
        let (p, actions) = run(vec![Input::Start, Input::ShimConnected, Input::Spawned]);
        assert_eq!(p.state, RunState::Running);
        assert!(p.sandbox);
        assert!(actions.is_empty());
    }

    #[test]
    fn an_agent_done_before_the_spawn_call_returns_still_counts() {
        let exited = Input::AgentExited {
            code: Some(0),
            signal: None,
        };
        let (p, _) = run(vec![Input::Start, Input::ShimConnected, exited.clone()]);
        assert_eq!(p.state, RunState::Succeeded);
        // The sandbox handle arrives last and is removed.
        let (p, actions) = run(vec![
            Input::Start,
            Input::ShimConnected,
            exited,
            Input::Spawned,
        ]);
        assert_eq!(p.state, RunState::Succeeded);
        assert_eq!(actions, vec![Action::KillSandbox]);
    }

    #[test]
    fn a_stop_before_the_spawn_call_returns_stays_graceful() {
        let (p, actions) = run(vec![
            Input::Start,
            Input::ShimConnected,
            Input::Stop { grace_s: 3 },
        ]);
        assert_eq!(p.state, RunState::Stopping);
        assert!(actions.contains(&Action::SendStop { grace_s: 3 }));
        let (p, _) = run(vec![
            Input::Start,
            Input::ShimConnected,
            Input::Stop { grace_s: 3 },
            Input::Spawned,
        ]);
        assert_eq!(p.state, RunState::Stopping);
        assert!(p.sandbox);
    }

    #[test]
    fn spawn_failure_fails_with_its_kind() {
        let (p, _) = run(vec![
            Input::Start,
            Input::SpawnFailed(Failure::new(FailureKind::ImagePullFailed, "no such image")),
        ]);
        assert_eq!(p.state, RunState::Failed);
        assert_eq!(p.failure.unwrap().kind, FailureKind::ImagePullFailed);
    }
}
