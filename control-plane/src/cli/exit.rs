//! Exit codes of the client verbs.

use actors::model::RunState;

/// The run succeeded (or the verb did what it was asked).
pub const SUCCESS: u8 = 0;
/// The run failed.
pub const FAILED: u8 = 1;
/// Bad command line, unreachable server or an error from the API.
pub const USAGE_OR_CONNECTION: u8 = 2;
/// The run was stopped on request.
pub const STOPPED: u8 = 3;
/// The run was killed on request.
pub const KILLED: u8 = 4;
/// Interrupted by Ctrl-C while following; the run itself keeps going.
pub const INTERRUPTED: u8 = 130;

/// Shown under `codebolt agent start --help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes (when following the run):
    0  the run succeeded (with --detach: the run was created)
    1  the run failed
    2  usage error, server unreachable or the API returned an error
    3  the run was stopped
    4  the run was killed
  130  interrupted with Ctrl-C; the run keeps going";

/// The exit code that reports a run which ended in `state`, or `None` while it is still live.
pub fn for_state(state: RunState) -> Option<u8> {
    match state {
        RunState::Succeeded => Some(SUCCESS),
        RunState::Failed => Some(FAILED),
        RunState::Stopped => Some(STOPPED),
        RunState::Killed => Some(KILLED),
        RunState::Pending
        | RunState::Provisioning
        | RunState::Starting
        | RunState::Running
        | RunState::Stopping => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_map_to_distinct_codes() {
        assert_eq!(for_state(RunState::Succeeded), Some(0));
        assert_eq!(for_state(RunState::Failed), Some(1));
        assert_eq!(for_state(RunState::Stopped), Some(3));
        assert_eq!(for_state(RunState::Killed), Some(4));
    }

    #[test]
    fn exactly_the_terminal_states_have_a_code() {
        for state in RunState::ALL {
            assert_eq!(for_state(state).is_some(), state.is_terminal(), "{state}");
        }
    }

    #[test]
    fn no_run_outcome_collides_with_usage_errors() {
        for state in RunState::ALL {
            assert_ne!(for_state(state), Some(USAGE_OR_CONNECTION), "{state}");
        }
    }
}
