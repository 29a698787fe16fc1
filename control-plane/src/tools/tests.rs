//! The tools through the `ToolHost` seam, against a temporary workspace.

use std::os::unix::fs::symlink;

use serde_json::json;
use uuid::Uuid;

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    tools: WorkspaceTools,
}

/// `<tmp>/ws` is the workspace; `<tmp>/outside` holds a secret and a directory it must not reach.
fn fixture() -> Fixture {
    fixture_with(ToolLimits::default())
}

fn fixture_with(limits: ToolLimits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ws");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("src/nested")).unwrap();
    std::fs::create_dir_all(root.join(".git")).unwrap();
    std::fs::create_dir_all(outside.join("dir")).unwrap();
    std::fs::write(root.join("README.md"), "# Demo\nhello world\n").unwrap();
    std::fs::write(root.join("src/lib.rs"), "fn hello() {}\r\nfn other() {}\n").unwrap();
    std::fs::write(root.join("src/nested/deep.txt"), "deep hello\n").unwrap();
    std::fs::write(root.join(".git/config"), "hello from git\n").unwrap();
    std::fs::write(root.join("blob.bin"), b"hello\0binary").unwrap();
    std::fs::write(outside.join("secret.txt"), "hello secret\n").unwrap();
    let tools = WorkspaceTools::with_limits(root.clone(), limits).unwrap();
    Fixture {
        _dir: dir,
        root,
        outside,
        tools,
    }
}

impl Fixture {
    async fn call(&self, tool: &str, args: Value) -> Result<Value, ToolFailure> {
        self.tools.call(Uuid::nil(), tool, args).await
    }

    async fn ok(&self, tool: &str, args: Value) -> Value {
        match self.call(tool, args.clone()).await {
            Ok(value) => value,
            Err(failure) => panic!("{tool} {args}: {failure}"),
        }
    }

    async fn fail(&self, tool: &str, args: Value) -> ToolFailure {
        match self.call(tool, args.clone()).await {
            Ok(value) => panic!("{tool} {args}: expected a failure, got {value}"),
            Err(failure) => failure,
        }
    }
}

#[test]
fn new_canonicalizes_and_refuses_non_directories() {
    let f = fixture();
    let dotted = f.root.join("src/..");
    let tools = WorkspaceTools::new(dotted).unwrap();
    assert_eq!(tools.root(), f.root.canonicalize().unwrap());
    assert!(matches!(
        WorkspaceTools::new(f.root.join("README.md")),
        Err(ToolsError::NotADirectory { .. })
    ));
    assert!(matches!(
        WorkspaceTools::new(f.root.join("missing")),
        Err(ToolsError::Workspace { .. })
    ));
    assert_eq!(f.tools.tools(), TOOLS.to_vec());
}

#[tokio::test]
async fn read_file_returns_content() {
    let f = fixture();
    let value = f.ok(READ_FILE, json!({"path": "README.md"})).await;
    assert_eq!(value, json!({"content": "# Demo\nhello world\n"}));
    let value = f
        .ok(READ_FILE, json!({"path": "./src/nested/../lib.rs"}))
        .await;
    assert_eq!(value["content"], "fn hello() {}\r\nfn other() {}\n");
}

#[tokio::test]
async fn read_file_errors() {
    let f = fixture();
    let failure = f.fail(READ_FILE, json!({"path": "nope.txt"})).await;
    assert_eq!(failure.code, codes::NOT_FOUND);
    assert!(
        failure.message.contains("`nope.txt`"),
        "{}",
        failure.message
    );
    assert_eq!(
        f.fail(READ_FILE, json!({"path": "README.md/x"})).await.code,
        codes::NOT_FOUND
    );
    assert_eq!(
        f.fail(READ_FILE, json!({"path": "src"})).await.code,
        codes::INVALID_ARGS
    );
    std::fs::write(f.root.join("latin1.txt"), b"caf\xe9").unwrap();
    let failure = f.fail(READ_FILE, json!({"path": "latin1.txt"})).await;
    assert_eq!(failure.code, codes::IO_ERROR);
    assert_eq!(failure.message, "`latin1.txt` is not utf-8 text");
    let failure = f.fail(READ_FILE, json!({})).await;
    assert_eq!(failure.code, codes::INVALID_ARGS);
    assert_eq!(
        failure.message,
        "fs.read_file: argument `path` is required (a string)"
    );
    let failure = f.fail(READ_FILE, json!({"path": 7})).await;
    assert_eq!(
        failure.message,
        "fs.read_file: argument `path` must be a string"
    );
    let failure = f.fail(READ_FILE, json!({"path": ""})).await;
    assert_eq!(
        failure.message,
        "fs.read_file: argument `path` must not be empty"
    );
    let failure = f.fail(READ_FILE, json!({"path": "a", "paht": "b"})).await;
    assert_eq!(failure.code, codes::INVALID_ARGS);
    assert!(failure.message.contains("`paht`"), "{}", failure.message);
    let failure = f.fail(READ_FILE, json!(["README.md"])).await;
    assert_eq!(failure.code, codes::INVALID_ARGS);
}

#[tokio::test]
async fn special_files_are_not_opened() {
    let f = fixture();
    let fifo = f.root.join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|status| status.success()) {
        eprintln!("mkfifo unavailable; skipping");
        return;
    }
    let failure = f.fail(READ_FILE, json!({"path": "pipe"})).await;
    assert_eq!(failure.message, "`pipe` is not a regular file");
    let failure = f
        .fail(WRITE_FILE, json!({"path": "pipe", "content": "x"}))
        .await;
    assert_eq!(failure.code, codes::INVALID_ARGS);
    // fs.search passes it by.
    f.ok(SEARCH, json!({"pattern": "x"})).await;
}

#[tokio::test]
async fn read_file_over_the_limit_is_too_large() {
    let f = fixture_with(ToolLimits {
        max_read_bytes: 10,
        ..ToolLimits::default()
    });
    std::fs::write(f.root.join("ten.txt"), "0123456789").unwrap();
    std::fs::write(f.root.join("eleven.txt"), "0123456789A").unwrap();
    assert_eq!(
        f.ok(READ_FILE, json!({"path": "ten.txt"})).await["content"],
        "0123456789"
    );
    let failure = f.fail(READ_FILE, json!({"path": "eleven.txt"})).await;
    assert_eq!(failure.code, codes::TOO_LARGE);
    assert!(
        failure.message.contains("`eleven.txt`"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn write_file_creates_parents_and_overwrites() {
    let f = fixture();
    let value = f
        .ok(
            WRITE_FILE,
            json!({"path": "out/sub/new.txt", "content": "héllo"}),
        )
        .await;
    assert_eq!(value, json!({"bytes_written": 6}));
    assert_eq!(
        std::fs::read_to_string(f.root.join("out/sub/new.txt")).unwrap(),
        "héllo"
    );
    f.ok(WRITE_FILE, json!({"path": "README.md", "content": ""}))
        .await;
    assert_eq!(
        std::fs::read_to_string(f.root.join("README.md")).unwrap(),
        ""
    );
    let read = f.ok(READ_FILE, json!({"path": "out/sub/new.txt"})).await;
    assert_eq!(read["content"], "héllo");
}

#[tokio::test]
async fn write_file_errors() {
    let f = fixture_with(ToolLimits {
        max_write_bytes: 4,
        ..ToolLimits::default()
    });
    assert_eq!(
        f.fail(WRITE_FILE, json!({"path": "a.txt", "content": "12345"}))
            .await
            .code,
        codes::TOO_LARGE
    );
    assert!(!f.root.join("a.txt").exists());
    let failure = f.fail(WRITE_FILE, json!({"path": "a.txt"})).await;
    assert_eq!(failure.code, codes::INVALID_ARGS);
    assert!(failure.message.contains("`content`"), "{}", failure.message);
    assert_eq!(
        f.fail(WRITE_FILE, json!({"path": "src", "content": "x"}))
            .await
            .code,
        codes::INVALID_ARGS
    );
    assert_eq!(
        f.fail(WRITE_FILE, json!({"path": ".", "content": "x"}))
            .await
            .code,
        codes::INVALID_ARGS
    );
    assert_eq!(
        f.fail(WRITE_FILE, json!({"path": "README.md/x", "content": "x"}))
            .await
            .code,
        codes::NOT_FOUND
    );
}

#[tokio::test]
async fn list_dir_sorts_entries_and_reports_kinds() {
    let f = fixture();
    symlink("src", f.root.join("src-link")).unwrap();
    let value = f.ok(LIST_DIR, json!({})).await;
    assert_eq!(
        value,
        json!({
            "entries": [
                {"name": ".git", "kind": "dir"},
                {"name": "README.md", "kind": "file"},
                {"name": "blob.bin", "kind": "file"},
                {"name": "src", "kind": "dir"},
                {"name": "src-link", "kind": "dir"},
            ],
            "truncated": false,
        })
    );
    let value = f.ok(LIST_DIR, json!({"path": "src"})).await;
    assert_eq!(
        value["entries"],
        json!([{"name": "lib.rs", "kind": "file"}, {"name": "nested", "kind": "dir"}])
    );
    assert_eq!(
        f.ok(LIST_DIR, json!({"path": "src-link"})).await,
        f.ok(LIST_DIR, json!({"path": "src"})).await
    );
}

#[tokio::test]
async fn list_dir_errors_and_truncation() {
    let f = fixture_with(ToolLimits {
        max_list_entries: 2,
        ..ToolLimits::default()
    });
    assert_eq!(
        f.fail(LIST_DIR, json!({"path": "missing"})).await.code,
        codes::NOT_FOUND
    );
    assert_eq!(
        f.fail(LIST_DIR, json!({"path": "README.md"})).await.code,
        codes::INVALID_ARGS
    );
    assert_eq!(
        f.fail(LIST_DIR, json!({"path": true})).await.code,
        codes::INVALID_ARGS
    );
    let value = f.ok(LIST_DIR, json!({"path": "."})).await;
    assert_eq!(value["entries"].as_array().unwrap().len(), 2);
    assert_eq!(value["truncated"], true);
}

#[tokio::test]
async fn search_substring_skips_git_and_binary_files() {
    let f = fixture();
    let value = f.ok(SEARCH, json!({"pattern": "hello"})).await;
    assert_eq!(
        value,
        json!({
            "matches": [
                {"path": "README.md", "line": 2, "text": "hello world"},
                {"path": "src/lib.rs", "line": 1, "text": "fn hello() {}"},
                {"path": "src/nested/deep.txt", "line": 1, "text": "deep hello"},
            ],
            "truncated": false,
        })
    );
    // A regex metacharacter is literal without `regex: true`.
    assert_eq!(
        f.ok(SEARCH, json!({"pattern": "fn .*\\("})).await["matches"],
        json!([])
    );
}

#[tokio::test]
async fn search_with_regex_and_a_path() {
    let f = fixture();
    let value = f
        .ok(
            SEARCH,
            json!({"pattern": "^fn \\w+\\(", "regex": true, "path": "src"}),
        )
        .await;
    assert_eq!(
        value["matches"],
        json!([
            {"path": "src/lib.rs", "line": 1, "text": "fn hello() {}"},
            {"path": "src/lib.rs", "line": 2, "text": "fn other() {}"},
        ])
    );
    let value = f
        .ok(
            SEARCH,
            json!({"pattern": "hello", "path": "src/nested/deep.txt"}),
        )
        .await;
    assert_eq!(
        value["matches"],
        json!([{"path": "src/nested/deep.txt", "line": 1, "text": "deep hello"}])
    );
}

#[tokio::test]
async fn search_does_not_follow_symlinks_out() {
    let f = fixture();
    symlink(&f.outside, f.root.join("out-dir")).unwrap();
    symlink(f.outside.join("secret.txt"), f.root.join("out-file")).unwrap();
    let value = f.ok(SEARCH, json!({"pattern": "secret"})).await;
    assert_eq!(value["matches"], json!([]));
    assert_eq!(
        f.fail(SEARCH, json!({"pattern": "secret", "path": "out-dir"}))
            .await
            .code,
        codes::OUTSIDE_WORKSPACE
    );
}

#[tokio::test]
async fn search_truncates_and_clips() {
    let f = fixture_with(ToolLimits {
        max_search_matches: 3,
        max_match_text_chars: 5,
        ..ToolLimits::default()
    });
    let many: String = (0..10).map(|i| format!("match number {i}\n")).collect();
    std::fs::write(f.root.join("many.txt"), many).unwrap();
    let value = f
        .ok(SEARCH, json!({"pattern": "match", "path": "many.txt"}))
        .await;
    assert_eq!(value["truncated"], true);
    let matches = value["matches"].as_array().unwrap();
    assert_eq!(matches.len(), 3);
    assert_eq!(
        matches[2],
        json!({"path": "many.txt", "line": 3, "text": "match…"})
    );
    // Exactly at the limit is not truncated.
    std::fs::write(f.root.join("three.txt"), "match\nmatch\nmatch\n").unwrap();
    let value = f
        .ok(SEARCH, json!({"pattern": "match", "path": "three.txt"}))
        .await;
    assert_eq!(value["truncated"], false);
}

#[tokio::test]
async fn search_errors() {
    let f = fixture();
    let failure = f.fail(SEARCH, json!({"path": "src"})).await;
    assert_eq!(failure.code, codes::INVALID_ARGS);
    assert!(failure.message.contains("`pattern`"), "{}", failure.message);
    let failure = f.fail(SEARCH, json!({"pattern": "(", "regex": true})).await;
    assert_eq!(failure.code, codes::INVALID_ARGS);
    assert!(
        failure.message.contains("`pattern` is not a valid regex"),
        "{}",
        failure.message
    );
    assert_eq!(
        f.fail(SEARCH, json!({"pattern": ""})).await.code,
        codes::INVALID_ARGS
    );
    let failure = f
        .fail(SEARCH, json!({"pattern": "x", "regex": "yes"}))
        .await;
    assert!(
        failure.message.contains("`regex` must be a boolean"),
        "{}",
        failure.message
    );
    assert_eq!(
        f.fail(SEARCH, json!({"pattern": "x", "path": "missing"}))
            .await
            .code,
        codes::NOT_FOUND
    );
}

#[tokio::test]
async fn unknown_tool_is_named() {
    let f = fixture();
    let failure = f.fail("shell.exec", json!({"cmd": "rm -rf /"})).await;
    assert_eq!(failure.code, codes::UNKNOWN_TOOL);
    assert!(
        failure.message.contains("`shell.exec`"),
        "{}",
        failure.message
    );
}

/// Every tool refuses absolute paths, `..` above the root and symlinks that lead out,
/// naming the path, and nothing outside is read or written.
#[tokio::test]
async fn every_tool_is_confined_to_the_workspace() {
    let f = fixture();
    symlink(f.outside.join("secret.txt"), f.root.join("file-link")).unwrap();
    symlink(&f.outside, f.root.join("dir-link")).unwrap();
    symlink("../../outside/dir", f.root.join("src/rel-link")).unwrap();
    symlink(f.outside.join("planted.txt"), f.root.join("dangling-link")).unwrap();
    let secret = f.outside.join("secret.txt");
    let secret = secret.to_str().unwrap();
    let escapes = [
        secret,
        "/etc/passwd",
        "../outside/secret.txt",
        "src/../../outside/secret.txt",
        "file-link",
        "dir-link/secret.txt",
        "src/rel-link",
        "dangling-link",
    ];
    for path in escapes {
        for (tool, args) in [
            (READ_FILE, json!({"path": path})),
            (WRITE_FILE, json!({"path": path, "content": "pwned"})),
            (LIST_DIR, json!({"path": path})),
            (SEARCH, json!({"pattern": "hello", "path": path})),
        ] {
            let failure = f.fail(tool, args).await;
            assert_eq!(
                failure.code,
                codes::OUTSIDE_WORKSPACE,
                "{tool} {path}: {failure}"
            );
            assert!(
                failure.message.contains(path),
                "{tool} {path}: {}",
                failure.message
            );
        }
    }
    // Writes into a directory symlink that leads out, even to a new subdirectory.
    for path in [
        "dir-link/new.txt",
        "dir-link/a/b/new.txt",
        "src/rel-link/new.txt",
    ] {
        let failure = f
            .fail(WRITE_FILE, json!({"path": path, "content": "pwned"}))
            .await;
        assert_eq!(failure.code, codes::OUTSIDE_WORKSPACE, "{path}");
    }
    assert_eq!(
        std::fs::read_to_string(f.outside.join("secret.txt")).unwrap(),
        "hello secret\n"
    );
    assert!(!f.outside.join("planted.txt").exists());
    assert!(!f.outside.join("new.txt").exists());
    assert!(!f.outside.join("a").exists());
    assert!(!f.outside.join("dir/new.txt").exists());
}

#[tokio::test]
async fn symlinks_inside_the_workspace_work() {
    let f = fixture();
    symlink("README.md", f.root.join("readme-link")).unwrap();
    symlink("src/nested", f.root.join("nested-link")).unwrap();
    symlink("src/planned.txt", f.root.join("dangling-in")).unwrap();
    assert_eq!(
        f.ok(READ_FILE, json!({"path": "readme-link"})).await["content"],
        "# Demo\nhello world\n"
    );
    f.ok(
        WRITE_FILE,
        json!({"path": "nested-link/via-link.txt", "content": "x"}),
    )
    .await;
    assert!(f.root.join("src/nested/via-link.txt").exists());
    // Writing through a dangling symlink that stays inside creates its target, as the OS would.
    f.ok(WRITE_FILE, json!({"path": "dangling-in", "content": "y"}))
        .await;
    assert_eq!(
        std::fs::read_to_string(f.root.join("src/planned.txt")).unwrap(),
        "y"
    );
}

#[tokio::test]
async fn call_now_answers_what_call_answers_or_leaves_the_call() {
    let f = fixture();
    let now = |tool: &str, args: Value| {
        f.tools
            .call_now(Uuid::nil(), tool, &args)
            .map(|ready| serde_json::from_str::<Value>(&ready.json).unwrap())
    };
    // Warm the page cache so the read cannot wait.
    f.ok(READ_FILE, json!({"path": "README.md"})).await;
    for path in ["README.md", "./src/nested/../lib.rs"] {
        let args = json!({ "path": path });
        assert_eq!(
            now(READ_FILE, args.clone()),
            Some(f.ok(READ_FILE, args).await),
            "{path}"
        );
    }
    // Errors, other tools and malformed arguments are left to `call`, which words them.
    for (tool, args) in [
        (READ_FILE, json!({"path": "nope.txt"})),
        (READ_FILE, json!({"path": "src"})),
        (READ_FILE, json!({"path": "../outside/secret.txt"})),
        (READ_FILE, json!({"path": ""})),
        (READ_FILE, json!({"path": 7})),
        (READ_FILE, json!({"path": "README.md", "paht": "b"})),
        (READ_FILE, json!(["README.md"])),
        (LIST_DIR, json!({"path": "."})),
        ("fs.unknown", json!({"path": "README.md"})),
    ] {
        assert_eq!(now(tool, args.clone()), None, "{tool} {args}");
    }
}
