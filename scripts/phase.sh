# `phase WHAT ABOUT COMMAND...` (sourced by scripts/setup.sh): prints one line, "setup: WHAT (ABOUT) ... done in N s",
# with the command's output kept in a log; if the command fails, the line ends in FAILED and the log's last 60
# lines follow (pip's, or the compiler's error), and the shell exits 1.
phase() {
  local what=$1 about=$2 started=$SECONDS log
  shift 2
  log=$(mktemp -t dpar-setup.XXXXXX)
  printf 'setup: %s (%s) ... ' "$what" "$about"
  if "$@" >"$log" 2>&1; then
    echo "done in $((SECONDS - started)) s"
    rm -f "$log"
  else
    echo "FAILED after $((SECONDS - started)) s; the last lines of its output:"
    tail -n 60 "$log"
    rm -f "$log"
    exit 1
  fi
}
