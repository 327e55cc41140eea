#!/usr/bin/env bash
# The tests that once failed on a busy or niced machine (#43), run at nice 19 beside a busy loop
# that keeps one core at normal priority: they must pass there too. Usage: bash scripts/test_busy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
( while :; do :; done ) &
busy=$!
trap 'kill $busy' EXIT
nice -n 19 .venv/bin/python -m pytest -q -p no:cacheprovider \
    "tests/test_bulk.py::test_models_another_process_is_compiling_are_loaded_last" \
    "tests/test_compile.py::test_event_loop_keeps_ticking_while_four_models_compile" \
    "tests/test_many_workers.py::test_an_awaited_check_runs_at_the_callers_priority" \
    "tests/test_export.py::test_abandoned_export_leaves_nothing_half_written" \
    "tests/test_reliability.py::test_sigkill_during_prune_leaves_only_whole_entries" \
    "tests/test_many_workers.py::test_a_worker_waiting_on_a_stalled_builder_compiles_by_itself" \
    tests/test_sentinel.py tests/test_shutdown.py tests/test_servers.py
