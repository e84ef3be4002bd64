"""The reliability scripts behind bench/RESULTS.md, each in a short form, so neither can rot unseen: the
attacks that take seconds (bench/attacks.py) and a soak of 15 s (bench/soak.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_the_attack_script_measures_what_the_server_did(tmp_path: Path) -> None:
    out = tmp_path / "attacks.json"
    run = run_script("-m", "bench.attacks", "strangers", "protocol", "drain", "resume_race", "--json",
                     str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(out.read_text())
    strangers = figures["strangers"]
    assert (strangers["Origin evil.example"], strangers["no token"], strangers["wrong token"],
            strangers["right token"], strangers["token in the log"]) == (403, 401, 403, 101, False)
    assert figures["protocol"]["70 kB text: close code"] == 1009
    assert figures["protocol"]["POST /health"] == 405 and figures["protocol"]["HEAD / body bytes"] == 0
    drain = figures["drain"]
    assert drain["newcomer during drain"] == 503 and drain["exit code"] == 0
    assert drain["live session: frames lost"] == 0
    race = figures["resume_race"]
    assert race["rounds with the session on exactly one connection at the end"] == 20
    assert race["rounds with two connections carrying it"] == 0
    assert (race["resumed, then taken over by the other (4001)"]
            + race["losers told resume_failed with a fresh session"]) == 20
    assert race["after: sessions_active"] == 0 and race["after: voice_sessions_detached"] == 0


def test_the_soak_samples_every_process_and_leaves_nothing_behind(demo_checkpoint: str,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = run_script("-m", "bench.soak", "--minutes", "0.25", "--sessions", "4", "--drop-every", "5",
                     "--json", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    soak = json.loads(out.read_text())
    assert soak["exit_code"] == 0 and len(soak["samples"]) >= 2
    assert {"supervisor", "network", "vad", "inference"} <= set(soak["samples"][-1]["rss_mb"])
    assert set(soak["frames_out"]) == {"normal-0", "never-reading", "reconnecting", "resuming"}
    assert soak["frames_out"]["normal-0"] > 0 and soak["frames_out"]["never-reading"] == 0
    # The resuming client's link dropped twice (at 5 and 10 s) and its session came back each time.
    assert len(soak["drops"]) == 2 and all(d["resumed"] for d in soak["drops"])
    assert soak["end"]["sessions_resumed_total"] == 2 and soak["end"]["sessions_detached"] == 0
    assert soak["verdict"] and all(soak["verdict"].values()), soak["verdict"]
    assert "/dev/shm after exit: 0" in run.stdout


def test_the_resume_time_script_cuts_resumes_and_checks_the_slots(tmp_path: Path) -> None:
    out = tmp_path / "resume.json"
    run = run_script("-m", "bench.resume_time", "--cuts", "3", "--outage", "0.2", "--json", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    figures = json.loads(out.read_text())
    assert figures["same_session"] and figures["resumed_total"] == 3 and figures["resume_failures"] == 0
    assert len(figures["after_restore_ms"]) == len(figures["first_audio_ms"]) == 3
    assert figures["sessions_active_after"] == 0 and figures["detached_after"] == 0
