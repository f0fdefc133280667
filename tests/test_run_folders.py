"""Run folders tell the truth and are their owner's: dry runs are marked and never "the newest",
recent runs come newest first, unknown steps are errors, runs that never ran leave nothing, and
no job starts from a folder or pickle someone else could write.
"""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import EXAMPLES
from slurmtune.cluster.profiles import ClusterProfile
from slurmtune.cluster.slurm import Request, private_folder_check, render_script
from slurmtune.runs.folder import Run, recent_runs

SAMPLE = EXAMPLES / "speechgradebook" / "exported.json"


def manifest(tmp_path, name: str, profile_extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""name: {name}
output_dir: {json.dumps(str(tmp_path / 'runs'))}
data:
  format: speechgradebook
  inputs: [{json.dumps(str(SAMPLE))}]
model:
  path: {json.dumps(str(tmp_path / 'tiny'))}
  tiny_arch: llama
slurm: {{time_min: 10, gpus: 0}}
""", encoding="utf-8")
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A convert run that ran (name 'zz'), then a dry run created after it (name 'aa')."""
    from slurmtune.cli.main import main
    tmp = tmp_path_factory.mktemp("folders")
    assert main(["submit", "convert", str(manifest(tmp, "zz")), "--executor", "local"]) == 0
    assert main(["submit", "convert", str(manifest(tmp, "aa")), "--executor", "local", "--dry-run"]) == 0
    ran, dry = sorted(recent_runs(tmp / "runs"), key=lambda r: r.record.dry_run)
    return tmp, ran, dry


def test_a_dry_run_is_marked_and_never_the_newest(two_runs, cli):
    tmp, ran, dry = two_runs
    assert [r.run_id for r in recent_runs(tmp / "runs")] == [dry.run_id, ran.run_id]  # by creation
    r = cli("status", "--root", tmp / "runs")
    assert r.code == 0 and r.out.splitlines()[0].startswith(f"run {ran.run_id}  (local)  COMPLETED")
    r = cli("status", dry.dir)
    assert r.code == 0 and r.out.splitlines()[0] == f"run {dry.run_id}  (local)  DRY-RUN"
    assert "  convert    DRY-RUN     -" in r.out
    report = json.loads(cli("status", dry.dir, "--json").out)
    assert report["state"] == "DRY-RUN" and [s["state"] for s in report["steps"]] == ["DRY-RUN"]


def test_unknown_runs_list_the_recent_ones_newest_first(two_runs, cli):
    tmp, ran, dry = two_runs
    r = cli("status", "nope", "--root", tmp / "runs")
    assert r.code == 2
    assert r.err == (f"slurmtune: error: no run 'nope' under {(tmp / 'runs').resolve()}; "
                     f"recent: {dry.run_id}, {ran.run_id}\n")


def test_logs_of_an_unknown_step_is_a_usage_error(two_runs, cli):
    _, ran, _ = two_runs
    r = cli("logs", ran.dir, "trian")
    assert (r.code, r.out) == (2, "")
    assert r.err == f"slurmtune: error: run {ran.run_id} has no step 'trian'; steps: convert\n"
    assert cli("logs", ran.dir, "convert").code == 0


def test_run_folders_are_owner_only_and_so_are_the_pickles(two_runs):
    _, ran, dry = two_runs
    for run in (ran, dry):
        assert [mode(run.dir / sub) for sub in ("", "slurm", "status")] == [0o700] * 3
    pickles = list(ran.slurm_dir.glob("*.pkl"))
    assert pickles and all(mode(p) & 0o027 == 0 for p in pickles)


def test_a_run_group_may_read_but_not_write(tmp_path, cli):
    group = grp.getgrgid(os.getgid()).gr_name
    profile = tmp_path / "site.yaml"
    profile.write_text(f"run_group: {group}\n")
    m = manifest(tmp_path, "shared")
    r = cli("submit", "convert", m, "--executor", "local", "--cluster", profile, "--dry-run")
    assert r.code == 0, r.err
    (run,) = recent_runs(tmp_path / "runs")
    for sub in ("", "slurm", "status"):
        assert mode(run.dir / sub) == 0o2750 and (run.dir / sub).stat().st_gid == os.getgid()
    profile.write_text("run_group: no-such-group-here\n")
    r = cli("submit", "convert", m, "--executor", "local", "--cluster", profile, "--dry-run")
    assert r.code == 2 and r.err.startswith(
        "slurmtune: error: run_group 'no-such-group-here': no such group on this machine")
    assert len(recent_runs(tmp_path / "runs")) == 1  # nothing created for the refused one


def test_submitting_from_a_folder_others_can_write_is_refused(two_runs, cli):
    _, ran, _ = two_runs
    before = (ran.dir / "run.json").read_bytes(), sorted(ran.slurm_dir.iterdir())
    os.chmod(ran.slurm_dir, 0o770)
    try:
        r = cli("submit", "convert", ran.dir, "--executor", "local")
    finally:
        os.chmod(ran.slurm_dir, 0o700)
    assert r.code == 2
    assert r.err.splitlines()[-1] == (
        f"slurmtune: error: {ran.slurm_dir} is writable by group or others (mode 0770); whoever can "
        f"write there runs code as you; fix: chmod -R go-w {ran.dir} (or start a new run)")
    assert ((ran.dir / "run.json").read_bytes(), sorted(ran.slurm_dir.iterdir())) == before


def test_the_job_script_checks_its_folder_before_submitit_unpickles(tmp_path):
    """The check runs as the sbatch script's first lines; run here, it stops a job whose
    folder or pickle is writable by others before the next line (the job) can run."""
    run_dir = tmp_path / "run $(touch INJECTED) 'x'"
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True)
    os.chmod(run_dir, 0o700)
    os.chmod(slurm_dir, 0o700)
    script = render_script(slurm_dir, ClusterProfile(setup=["module load cuda"]), Request("train", 10))
    check = private_folder_check(slurm_dir)
    assert script.index(check[1]) < script.index("module load cuda") < script.index("submitit.core._submit")
    marker = tmp_path / "job-ran"
    job = tmp_path / "job.sh"
    job.write_text("\n".join([*check, f"touch {marker}"]) + "\n")

    def start() -> subprocess.CompletedProcess:
        marker.unlink(missing_ok=True)
        return subprocess.run(["bash", str(job)], capture_output=True, text=True, cwd=tmp_path)

    assert start().returncode == 0 and marker.exists()
    pickle = slurm_dir / "123_submitted.pkl"
    pickle.write_bytes(b"not run")
    for path, unsafe in [(pickle, 0o664), (slurm_dir, 0o777), (run_dir, 0o720)]:
        safe = mode(path)
        os.chmod(path, unsafe)
        result = start()
        os.chmod(path, safe)
        assert result.returncode == 1 and not marker.exists()
        assert result.stderr == (f"slurmtune: refusing to start: {path} is writable by others or not yours; "
                                 "whoever can write there runs code as you (fix: chmod -R go-w "
                                 f"{run_dir}, or start a new run)\n")
    assert not (tmp_path / "INJECTED").exists()


@pytest.mark.slurm
def test_a_controller_that_does_not_answer_is_one_line(slurm_cluster, cli, tmp_path, monkeypatch):
    conf = Path(slurm_cluster["SLURM_CONF"])
    dead = tmp_path / "slurm.conf"
    dead.write_text("".join(f"SlurmctldHost=nohost.invalid\n" if line.startswith("SlurmctldHost=") else line
                            for line in conf.read_text().splitlines(keepends=True)))
    monkeypatch.setenv("SLURM_CONF", str(dead))
    r = cli("submit", "convert", manifest(tmp_path, "dead"), "--cluster", "local-test", "--dry-run")
    assert r.code == 1 and r.out.count("\n") <= 1
    assert r.err == ("slurmtune: error: the SLURM controller did not answer `scontrol show partition -o` "
                     "(slurm_set_addr: Unable to resolve \"nohost.invalid\"); check it is up and that "
                     f"{dead} names it (run from a login node), or use --executor local\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
def test_a_run_sbatch_refuses_leaves_nothing(slurm_cluster, cli, tmp_path, monkeypatch):
    """Every check passes on the login node, then the controller rejects the job: the run
    folder, which never ran and never will, is removed again."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    profile = tmp_path / "no-such-feature.yaml"
    profile.write_text("partition: debug\nconstraint: nosuchfeature\ncpus_per_cpu_job: 1\nmem_gb_per_cpu_job: 1\n")
    r = cli("submit", "convert", manifest(tmp_path, "refused"), "--cluster", profile)
    assert r.code == 1
    (folder,) = [line.strip() for line in r.out.splitlines() if line.startswith("  /")]
    assert r.err.splitlines()[-2:] == [
        f"nothing was queued; removed {folder}",
        "slurmtune: error: sbatch failed: sbatch: error: Batch job submission failed: Invalid feature specification"]
    assert list((tmp_path / "runs").iterdir()) == []
