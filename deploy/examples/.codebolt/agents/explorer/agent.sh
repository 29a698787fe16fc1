#!/bin/sh
# explorer: an example codebolt agent in POSIX sh. It needs only sh, printf, read, sed, grep,
# tr, sort, uniq, head, cut and wc, so it also runs in a bare busybox container.
#
# Protocol (newline-delimited JSON): the first stdin line is
#   {"type":"task","run_id":"...","task":"..."}
# then the agent writes one object per line to stdout (message, tool_call, done) and reads each
# tool_result from stdin. stderr is the agent's log. SIGTERM (codebolt agent stop) ends it.

set -u
set -f

log() {
    printf 'explorer: %s\n' "$*" >&2
}

# json_str TEXT: TEXT as a JSON string literal, quotes included. Backslashes and quotes are
# escaped, newlines become \n, tabs and carriage returns spaces, other control characters go.
json_str() {
    printf '%s' "$1" | tr '\t\r' '  ' | tr -d '\000-\010\013-\037\177' |
        sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | {
        out='' l=''
        while IFS= read -r l; do
            out="$out$l\\n"
        done
        printf '"%s%s"' "$out" "$l"
    }
}

send() {
    printf '%s\n' "$1"
}

message() {
    send "{\"type\":\"message\",\"text\":$(json_str "$1")}"
}

# call TOOL ARGS_JSON: sends a tool call and waits for its result, left in RESULT.
# Returns 0 when the tool succeeded, 1 when it reported an error (ERROR holds the code).
CALLS=0
RESULT=''
ERROR=''
call() {
    CALLS=$((CALLS + 1))
    id="c$CALLS"
    send "{\"type\":\"tool_call\",\"id\":\"$id\",\"tool\":\"$1\",\"args\":$2}"
    while IFS= read -r RESULT; do
        case $RESULT in
        *'"tool_result"'*)
            if printf '%s' "$RESULT" | grep -q "\"id\" *: *\"$id\""; then
                if printf '%s' "$RESULT" | grep -q '"ok" *: *true'; then
                    ERROR=''
                    return 0
                fi
                ERROR=$(printf '%s' "$RESULT" | sed -n 's/.*"code" *: *"\([^"]*\)".*/\1/p')
                ERROR=${ERROR:-error}
                return 1
            fi
            ;;
        esac
        log "ignoring unexpected input: $(printf '%s' "$RESULT" | cut -c1-120)"
    done
    log "stdin closed while waiting for the result of $id ($1)"
    exit 1
}

# count PATTERN: how many times PATTERN (grep regex) occurs in RESULT.
count() {
    printf '%s' "$RESULT" | grep -o "$1" | wc -l | tr -d ' '
}

# string_values KEY: every "KEY":"value" in RESULT, one value a line (values without quotes).
string_values() {
    printf '%s' "$RESULT" | grep -o "\"$1\" *: *\"[^\"]*\"" | sed 's/^.*: *"\(.*\)"$/\1/'
}

# pick_word TASK: what to search for. A quoted word, else an upper-case word such as TODO,
# else the longest word of at least four characters, else TODO.
pick_word() {
    quoted=$(printf '%s' "$1" | sed -n "s/.*[\"\`']\([A-Za-z0-9_.-]\{2,\}\)[\"\`'].*/\1/p" | head -n 1)
    if [ -n "$quoted" ]; then
        printf '%s' "$quoted"
        return
    fi
    longest=''
    for w in $(printf '%s' "$1" | tr -c 'A-Za-z0-9_' ' '); do
        case $w in
        *[!A-Z0-9_]*) ;;
        *[A-Z]*)
            if [ ${#w} -ge 3 ]; then
                printf '%s' "$w"
                return
            fi
            ;;
        esac
        if [ ${#w} -gt ${#longest} ]; then
            longest=$w
        fi
    done
    if [ ${#longest} -ge 4 ]; then
        printf '%s' "$longest"
    else
        printf 'TODO'
    fi
}

# --- the task -------------------------------------------------------------------------------

IFS= read -r first || {
    log "no task on stdin"
    exit 1
}
case $first in
*'"type"'*'"task"'*) ;;
*)
    log "expected a task line first, got: $(printf '%s' "$first" | cut -c1-120)"
    exit 1
    ;;
esac
RUN_ID=${CODEBOLT_RUN_ID:-$(printf '%s' "$first" | sed -n 's/.*"run_id" *: *"\([^"]*\)".*/\1/p')}
if [ -n "${CODEBOLT_TASK:-}" ]; then
    TASK=$CODEBOLT_TASK
else
    # Fallback when the environment lacks the task: take it from the JSON line, roughly unescaped.
    TASK=$(printf '%s' "$first" |
        sed -n -E 's/.*"task" *: *"(([^"\\]|\\.)*)".*/\1/p' |
        sed -e 's/\\"/"/g' -e 's/\\[nrt]/ /g' -e 's/\\\//\//g' -e 's/\\\\/\\/g')
fi
log "run ${RUN_ID:-unknown}: $TASK"
message "Exploring the workspace for: $TASK"

# --- the workspace root ---------------------------------------------------------------------

entries=0 dirs=0 files=0 names=''
if call fs.list_dir '{"path":"."}'; then
    names=$(string_values name)
    entries=$(count '"name" *: *"')
    dirs=$(count '"kind" *: *"dir"')
    files=$(count '"kind" *: *"file"')
    message "The workspace root has $entries entries ($dirs directories, $files files)."
else
    message "Could not list the workspace root ($ERROR)."
fi

# --- the README -----------------------------------------------------------------------------

readme=$(printf '%s\n' "$names" | grep -i -E '^readme(\.md|\.txt)?$' | head -n 1)
readme_summary='No README in the workspace root.'
if [ -n "$readme" ]; then
    if call fs.read_file "{\"path\":$(json_str "$readme")}"; then
        lines=$(count '\\n')
        title=$(printf '%s' "$RESULT" | sed -n 's/.*"content" *: *"\([^"\\]*\).*/\1/p' | sed 's/^#* *//')
        readme_summary="$readme: $lines lines, first line \"$title\"."
        message "Read $readme ($lines lines): $title"
    else
        readme_summary="$readme could not be read ($ERROR)."
        message "Could not read $readme ($ERROR)."
    fi
fi

# --- the search -----------------------------------------------------------------------------

word=$(pick_word "$TASK")
matches=0 matched_files=0 top=''
if call fs.search "{\"pattern\":$(json_str "$word")}"; then
    matches=$(count '"path" *: *"')
    paths=$(string_values path)
    if [ -n "$paths" ]; then
        matched_files=$(printf '%s\n' "$paths" | sort -u | wc -l | tr -d ' ')
        top=$(printf '%s\n' "$paths" | sort | uniq -c | sort -rn | head -n 10 |
            sed 's/^ *\([0-9]*\) \(.*\)$/- \2 (\1)/')
    fi
    message "Found $matches matches for \"$word\" in $matched_files files."
else
    message "Searching for \"$word\" failed ($ERROR)."
fi

# --- the report -----------------------------------------------------------------------------

report="# Codebolt explorer report

Task: $TASK
Run: ${RUN_ID:-unknown}

## Workspace root

$entries entries: $dirs directories, $files files.
$(printf '%s\n' "$names" | sed -n '/./s/^/- /p')

## README

$readme_summary

## Search for \"$word\"

$matches matches in $matched_files files.
$top
"
if call fs.write_file "{\"path\":\"codebolt-report.md\",\"content\":$(json_str "$report")}"; then
    message "Wrote codebolt-report.md."
    outcome="wrote codebolt-report.md"
else
    message "Could not write codebolt-report.md ($ERROR)."
    outcome="could not write codebolt-report.md ($ERROR)"
fi

send "{\"type\":\"done\",\"result\":$(json_str "$entries entries, $matches matches for \"$word\"; $outcome")}"
exit 0
