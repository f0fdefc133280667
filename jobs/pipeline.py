"""A run as a chain of jobs: convert -> validate -> train -> eval (array) -> report.

::

    plan = plan_run(cfg)                         # which steps, what each asks for
    run = submit_run(cfg, plan, executor="slurm", profile=profile)

On SLURM each step is its own sbatch job depending ``afterok`` on the one
before (a failed step cancels the rest). With the local and debug executors
the steps run one after another in a single job, sharing one Python process
(imports of the ML stack cost seconds each).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slurmtune.config import RunConfig
from slurmtune.errors import UsageError
from slurmtune.train.distributed import world_size
from slurmtune.data.jsonio import write_json_atomic
from slurmtune.cluster.profiles import ClusterProfile
from slurmtune.runs.folder import Run, Step, group_id, has_eval, make_private_dir
from slurmtune.runs.sweep import Trial, expand, load_trials, trial_dir
from slurmtune.cluster.slurm import Request, render_script, submit

from slurmtune.jobs.base import Job, job_scope, requeue
from slurmtune.jobs.convert import ConvertJob
from slurmtune.jobs.eval import EvalJob
from slurmtune.jobs.report import ReportJob
from slurmtune.jobs.train import TrainJob
from slurmtune.jobs.train_deepspeed import TrainDeepSpeedJob
from slurmtune.jobs.trial import TrialJob
from slurmtune.jobs.validate import ValidateJob

JOBS: dict[str, type[Job]] = {cls.kind: cls for cls in
                              (ConvertJob, ValidateJob, TrainJob, TrainDeepSpeedJob, EvalJob, ReportJob)}
CPU_STEP_TIME_MIN = 30


@dataclass
class PlannedStep:
    name: str
    kind: str
    request: Request
    shards: int | None = None  # array tasks

    @property
    def gpus(self) -> int:
        return self.request.gpus_per_node * self.request.nodes


def plan_run(cfg: RunConfig, only: str | None = None) -> list[PlannedStep]:
    """The steps of a run (or the single step ``only``) and the resources of each."""
    cpu_time = min(CPU_STEP_TIME_MIN, cfg.slurm.time_min)
    steps = []
    if cfg.data.inputs:
        steps.append(PlannedStep("convert", "convert", Request(f"{cfg.name}-convert", cpu_time)))
    steps.append(PlannedStep("validate", "validate", Request(f"{cfg.name}-validate", cpu_time)))
    steps.append(PlannedStep("train", *_train_request(cfg)))
    if has_eval(cfg):
        shards = cfg.eval.shards
        steps.append(PlannedStep("eval", "eval", _gpu_request(
            cfg, f"{cfg.name}-eval", gpus_per_node=0 if cfg.eval.endpoint else min(cfg.slurm.gpus, 1),
            array_size=shards,
            array_parallelism=cfg.eval.array_parallelism), shards=shards))
        steps.append(PlannedStep("report", "report", Request(f"{cfg.name}-report", cpu_time)))
    if not only:
        return steps
    found = [s for s in steps if only in (s.kind, s.name)]
    if not found:
        raise UsageError(f"no step {only!r} in this run; steps: {', '.join(s.name for s in steps)}")
    return found


def _train_request(cfg: RunConfig) -> tuple[str, Request]:
    """(job kind, request) of the train step: one process on one GPU, or with DeepSpeed one
    task per GPU (with distributed.device=cpu, CPU processes and no GPU asked for)."""
    world = world_size(cfg)
    if world == 1:
        return "train", _gpu_request(cfg, f"{cfg.name}-train", gpus_per_node=cfg.slurm.gpus)
    tasks = cfg.distributed.gpus_per_node
    return "train_deepspeed", _gpu_request(
        cfg, f"{cfg.name}-train", gpus_per_node=0 if cfg.distributed.device == "cpu" else tasks,
        nodes=cfg.distributed.nodes, tasks_per_node=tasks)


def _gpu_request(cfg: RunConfig, name: str, **fields) -> Request:
    """A step that may use GPUs: the manifest's time and per-GPU CPUs and memory (the profile's
    when the manifest leaves them unset)."""
    return Request(name, cfg.slurm.time_min, cpus_per_gpu=cfg.slurm.cpus_per_gpu,
                   mem_gb_per_gpu=cfg.slurm.mem_gb_per_gpu, **fields)


def plan_sweep(cfg: RunConfig, manifest_dir: Path) -> tuple[list[Trial], list[PlannedStep]]:
    """The trials of a sweep (each with its resolved config) and what one trial task asks for."""
    trials = expand(cfg.sweep, cfg, manifest_dir)
    for trial in trials:
        trial.config.eval.shards = 1  # a trial evaluates inside its own array task
    # No shards: trials beyond MaxArraySize are split over several arrays (submit_trials).
    step = PlannedStep("trials", "trial", _trial_request(cfg, len(trials)))
    return trials, [step]


def _trial_request(cfg: RunConfig, size: int, hold: bool = False) -> Request:
    return _gpu_request(cfg, f"{cfg.name}-trial", gpus_per_node=min(cfg.slurm.gpus, 1), array_size=size,
                        array_parallelism=cfg.sweep.parallelism, hold=hold)


def submit_run(run: Run, plan: list[PlannedStep], executor: str, profile: ClusterProfile,
               dry_run: bool = False, echo: Callable[[str], None] = print) -> Run:
    """Submit the planned steps of ``run`` (or, with ``dry_run``, only write their scripts)."""
    jobs = [JOBS[step.kind](run.dir, step.name) for step in plan]
    if executor != "slurm":
        return _submit_in_one_job(run, plan, jobs, executor, profile, dry_run, echo)
    after: list[str] = []
    for step, job in zip(plan, jobs):
        if dry_run:
            text = render_script(run.slurm_dir, profile, step.request, after, array=bool(step.shards))
            path = run.slurm_dir / f"dry-run-{step.name}.sh"
            path.write_text(text, encoding="utf-8")
            run.add_step(Step(step.name, step.kind, [], step.shards, list(after), str(path), step.gpus))
            echo(f"# {step.name}: {path}\n{text}")
            after = [f"<{step.name}>"]
            continue
        items = list(range(step.shards)) if step.shards else None
        sub = submit("slurm", run.slurm_dir, profile, step.request, job, after=after, items=items)
        run.add_step(Step(step.name, step.kind, sub.job_ids, step.shards, list(after), sub.script, step.gpus))
        echo(f"{step.name}: job {', '.join(sub.job_ids)}" + (f" (array of {step.shards})" if step.shards else ""))
        after = sub.job_ids
    return run


class LocalPipeline:
    """The steps of a run, one after another, in one process (local and debug executors).
    ``items[i]`` lists the arguments job ``i`` runs with, one call each (its array tasks),
    or is None for a single call."""

    def __init__(self, jobs: list[Job], items: list[list | None], keep_going: bool = False):
        self.jobs, self.items, self.keep_going = jobs, items, keep_going

    def __call__(self) -> None:
        failed = 0
        with job_scope():
            for job, items in zip(self.jobs, self.items):
                for args in ([(item,) for item in items] if items is not None else [()]):
                    try:
                        job(*args)
                    except Exception:
                        if not self.keep_going:  # a pipeline stops; a sweep's other trials go on
                            raise
                        failed += 1
        if failed:
            raise RuntimeError(f"{failed} task(s) failed; see `slurmtune status`")

    def checkpoint(self, *args, **kwargs):
        return requeue(self, *args, **kwargs)


def _submit_in_one_job(run, plan, jobs, executor, profile, dry_run, echo) -> Run:
    pipeline = LocalPipeline(jobs, [list(range(s.shards)) if s.shards else None for s in plan])
    if dry_run:
        for step in plan:
            run.add_step(Step(step.name, step.kind, [], step.shards, [], None, step.gpus))
        echo(f"dry run: {executor} executor would run {', '.join(s.name for s in plan)} in one process")
        return run
    # A lone multi-process train step gets all its processes here (the local executor runs N tasks);
    # in a whole pipeline the other steps must not run N times, so it stays one process.
    tasks = plan[0].request.nodes * plan[0].request.tasks_per_node if len(plan) == 1 else 1
    request = Request(f"{run.run_id}", sum(s.request.time_min for s in plan),
                      gpus_per_node=max(s.request.gpus_per_node for s in plan), tasks_per_node=tasks)
    sub = submit(executor, run.slurm_dir, profile, request, pipeline)
    for step in plan:
        run.record.steps.append(Step(step.name, step.kind, sub.job_ids, step.shards, [], None, step.gpus))
    run.save()
    run.local_jobs = sub.jobs  # the caller may wait on them
    echo(f"{executor}: {', '.join(s.name for s in plan)} in process {sub.job_ids[0]}")
    return run


def create_sweep(cfg: RunConfig, trials: list[Trial], executor: str, cluster: str | None,
                 dry_run: bool, group: str | None = None) -> Run:
    """The sweep folder with one run folder per trial (from plan_sweep); nothing submitted yet."""
    run = Run.create(cfg, executor, cluster, dry_run, group)
    make_private_dir(run.dir / "trials", group_id(group))
    for trial in trials:
        Run.create_at(trial_dir(run.dir, trial), trial.config, executor, cluster, dry_run, group)
    write_json_atomic(run.dir / "sweep.json", {
        "metric": cfg.sweep.metric, "mode": cfg.sweep.mode,
        "trials": [t.to_json() for t in trials], "arrays": []})
    return run


def submit_trials(run: Run, indices: list[int], executor: str, profile: ClusterProfile, max_array: int,
                  dry_run: bool = False, hold: bool = False, echo: Callable[[str], None] = print) -> list[str]:
    """Submit trials ``indices`` as arrays of at most ``max_array`` tasks: one sbatch call each."""
    cfg = run.config()
    data, _ = load_trials(run.dir)
    job = TrialJob(run.dir, "trials")
    if executor != "slurm":
        return _submit_local(run, indices, executor, profile, job, dry_run, echo)
    blocks = [indices[i:i + max_array] for i in range(0, len(indices), max_array)]
    after: list[str] = []
    ids = []
    first = len(data["arrays"])  # a resubmission's arrays number on from the earlier ones
    for n, block in enumerate(blocks):
        name = f"trials-{first + n}"
        req = _trial_request(cfg, len(block), hold)
        if dry_run:
            script = run.slurm_dir / f"dry-run-{name}.sh"
            script.write_text(render_script(run.slurm_dir, profile, req, after, array=True), encoding="utf-8")
            run.add_step(Step(name, "trial", [], len(block), list(after), str(script), req.gpus_per_node))
            data["arrays"].append({"step": name, "job_id": None, "items": block})
            echo(f"{name}: {script} (array of {len(block)}, %{cfg.sweep.parallelism})")
            after = [f"afterany:<{name}>"]  # the job id it would have
            continue
        sub = submit("slurm", run.slurm_dir, profile, req, job, after=after, items=block)
        run.add_step(Step(name, "trial", sub.job_ids, len(block), list(after), sub.script, req.gpus_per_node))
        data["arrays"].append({"step": name, "job_id": sub.job_ids[0], "items": block})
        ids += sub.job_ids
        echo(f"{name}: array job {sub.job_ids[0]} of {len(block)} trials, at most {cfg.sweep.parallelism} at once")
        after = [f"afterany:{sub.job_ids[0]}"]  # the next block starts when this one is over
    write_json_atomic(run.dir / "sweep.json", data)
    return ids


def _submit_local(run, indices, executor, profile, job, dry_run, echo) -> list[str]:
    data, _ = load_trials(run.dir)
    name = f"trials-{len(data['arrays'])}"
    if dry_run:
        echo(f"dry run: {executor} executor would run {len(indices)} trials one after another")
        return []
    pipeline = LocalPipeline([job], [indices], keep_going=True)
    cfg = run.config()
    sub = submit(executor, run.slurm_dir, profile, Request(run.run_id, cfg.slurm.time_min * len(indices)), pipeline)
    data["arrays"].append({"step": name, "job_id": sub.job_ids[0], "items": indices, "local": True})
    write_json_atomic(run.dir / "sweep.json", data)
    run.record.steps.append(Step(name, "trial", sub.job_ids, len(indices), []))
    run.save()
    run.local_jobs = sub.jobs
    echo(f"{executor}: {len(indices)} trials in process {sub.job_ids[0]}")
    return sub.job_ids
