"""`peftkit train`: one process, or N worker processes started through torchrun / the DeepSpeed launcher.

`peftkit train RECIPE --nproc N` validates the recipe and prepares the run directory once, then
re-invokes `peftkit train` in every worker (torchrun `-m peftkit.cli train ...`). Workers recognise
themselves from the launcher's environment and train; global rank 0 writes the run directory. The
launching process forwards Ctrl-C to the workers (which checkpoint and stop), then reports the
outcome: the run summary, or how to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config.schema import Recipe
from peftkit.errors import ConfigError, PeftkitError, RunDirError
from peftkit.train import RESUME_KEYWORDS
from peftkit.utils import threads as cpu_threads

log = logging.getLogger(__name__)

WORKER_ENV = "PEFTKIT_WORKER"
"""Set by the launching `peftkit train` for its workers: they leave reporting to it."""
INTERRUPT_FLAG_ENV = "PEFTKIT_INTERRUPT_FLAG"
"""A file the launching `peftkit train` writes on Ctrl-C / SIGTERM before forwarding it. A worker that is not yet
running, or still ignores Ctrl-C as torchrun started it, would lose the signal: it looks for the file once its own
handler is in place, and stops at once."""
SHUTDOWN_TIMEOUT_S = 600
"""How long torchrun lets workers finish a checkpoint after SIGTERM before it kills them."""


class LaunchError(PeftkitError, RuntimeError):
    """The worker processes failed, or the launch options are inconsistent."""


# --------------------------------------------------------------------------------------------------
# Where this process stands


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def dist_info() -> DistInfo:
    """Rank and world size from the launcher's environment (torchrun and DeepSpeed set the same names)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return DistInfo(
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=world,
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
    )


def is_main_process() -> bool:
    """Global rank 0: the one process that writes the run directory."""
    return dist_info().rank == 0


def is_worker() -> bool:
    """Started by a launcher (torchrun, DeepSpeed, or `peftkit train --nproc`), so never launch again."""
    env = os.environ
    return WORKER_ENV in env or "TORCHELASTIC_RUN_ID" in env or int(env.get("WORLD_SIZE", "1")) > 1


# --------------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class LaunchOptions:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    hostfile: str | None = None
    launcher: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LaunchOptions":
        def given(name: str, default: int) -> int:  # 0 is a value the user gave (and `problems` refuses)
            value = getattr(args, name, None)
            return default if value is None else value

        return cls(
            nproc=given("nproc", 1),
            nnodes=given("nnodes", 1),
            node_rank=given("node_rank", 0),
            master_addr=getattr(args, "master_addr", None),
            master_port=getattr(args, "master_port", None),
            hostfile=getattr(args, "hostfile", None),
            launcher=getattr(args, "launcher", None),
        )

    @property
    def multi_process(self) -> bool:
        return self.nproc > 1 or self.nnodes > 1 or self.hostfile is not None

    @property
    def chosen_launcher(self) -> str:
        return self.launcher or ("deepspeed" if self.hostfile else "torchrun")

    def problems(self) -> list[str]:
        found = []
        if self.nproc < 1:
            found.append(f"--nproc must be at least 1, got {self.nproc}")
        if self.nnodes < 1:
            found.append(f"--nnodes must be at least 1, got {self.nnodes}")
        elif not 0 <= self.node_rank < self.nnodes:
            found.append(f"--node-rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.nnodes > 1 and not self.master_addr and not self.hostfile:
            found.append("--nnodes > 1 needs --master-addr (the address of the node with --node-rank 0)")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            found.append(f"--master-port must be a port number from 1 to 65535, got {self.master_port}")
        if self.hostfile and not Path(self.hostfile).expanduser().is_file():
            found.append(f"--hostfile {self.hostfile} does not exist")
        elif self.hostfile and (problem := hostfile_problem(Path(self.hostfile).expanduser())):
            found.append(problem)
        if self.hostfile and self.chosen_launcher == "torchrun":
            found.append("--hostfile is read by the DeepSpeed launcher; drop --launcher torchrun (or use --nnodes/--node-rank)")
        if self.chosen_launcher == "deepspeed" and self.nnodes > 1 and not self.hostfile:
            # its runner refuses --num_nodes with --include, or finds no other node ("no extra nodes available")
            found.append("--launcher deepspeed --nnodes > 1 needs --hostfile: the DeepSpeed launcher starts every node "
                         "from this one (over ssh) and reads them from that file; give --hostfile, or start "
                         "`peftkit train --nnodes N --node-rank I --master-addr ADDR` on each node (torchrun)")
        return found


def hostfile_problem(path: Path) -> str | None:
    """What DeepSpeed's launcher would reject in a hostfile (with a traceback that reads as a worker's failure)."""
    import re

    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    hosts = [line for line in lines if line and not line.startswith("#")]
    bad = next((line for line in hosts if not re.match(r"\S+\s+slots=\d+", line)), None)  # as DeepSpeed reads it
    if bad is not None:
        return f"--hostfile {path}: {bad!r} is not a `hostname slots=N` line (N: the GPUs or processes on that host)"
    if not hosts:
        return f"--hostfile {path} lists no hosts; write one `hostname slots=N` line per machine"
    names = [line.split()[0] for line in hosts]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        return f"--hostfile {path} lists {', '.join(twice)} more than once; write one line per machine"
    return None


# --------------------------------------------------------------------------------------------------
# The recipe, the run directory and what --resume means


@dataclass
class TrainRequest:
    recipe: Recipe
    recipe_arg: str
    """The RECIPE argument as given (a recipe file or a run directory), made absolute for workers."""
    resume: bool
    force: bool


def _deepspeed_override(value: str, recipe_file: Path, overrides: list[str]) -> str:
    """`--deepspeed STAGE|FILE` as a recipe override. A stage keeps the rest of a `deepspeed:` block and replaces a
    recipe's JSON path (a string has no `stage` to set)."""
    if value.strip() in {"0", "1", "2", "3"}:
        from peftkit.config.load import apply_overrides, read_yaml

        if isinstance(apply_overrides(read_yaml(recipe_file), list(overrides)).get("deepspeed"), str):
            return f"deepspeed={{stage: {value.strip()}}}"
        return f"deepspeed.stage={value.strip()}"
    path = Path(value).expanduser()
    if not path.is_file():
        raise LaunchError(f"--deepspeed {value}: no such file; pass a DeepSpeed JSON file or a ZeRO stage (0-3)")
    return f"deepspeed={json.dumps(str(path.resolve()))}"


def load_train_recipe(args: argparse.Namespace) -> tuple[Recipe, str]:
    """RECIPE may be a recipe file or a run directory (its recipe.yaml; the run stays in that directory)."""
    from peftkit.config import load_recipe

    target = Path(args.recipe).expanduser()
    overrides: list[str] = []
    if target.is_dir():
        if not (target / "recipe.yaml").is_file():
            found = sorted(p.name for p in target.glob("*.y*ml"))
            hint = f"; it holds {', '.join(found[:5])}" if found else ""
            raise RunDirError(f"{target} is a folder without recipe.yaml; give the recipe file itself (a .yaml file) "
                              f"or a peftkit run directory{hint}")
        overrides.append(f"output_dir={json.dumps(str(target.resolve()))}")
        recipe_file = target / "recipe.yaml"
    else:
        recipe_file = target
    overrides.extend(getattr(args, "overrides", None) or [])
    if getattr(args, "deepspeed", None):
        overrides.append(_deepspeed_override(args.deepspeed, recipe_file, overrides))
    resume = getattr(args, "resume", None)
    if resume not in RESUME_KEYWORDS:
        run_dir = Path(resume).expanduser()
        if not run_dir.is_dir():
            hint = " (put key=value overrides before --resume)" if "=" in resume else ""
            raise RunDirError(f"--resume takes an optional RUN_DIR or `auto`; {resume} is not a directory{hint}")
        overrides.append(f"output_dir={json.dumps(str(run_dir.resolve()))}")
    return load_recipe(recipe_file, overrides), str(target.resolve()) if target.exists() else str(target)


def _refuse_if_in_use(run_dir: Path) -> None:
    """Another process trains into `run_dir` (one killed a moment ago gets a few seconds to let go of the lock)."""
    from peftkit.train.run_dir import in_use, training_in

    holder = training_in(run_dir)
    for _ in range(10):
        if holder is None:
            return
        time.sleep(0.5)
        holder = training_in(run_dir)
    raise in_use(run_dir, holder)


def resolve_resume(resume_arg: str | None, run_dir: Path, force: bool) -> tuple[bool, bool]:
    """(resume, force) for `--resume [RUN_DIR|auto]`.

    Plain `--resume` and `--resume RUN_DIR` must find a complete checkpoint: a mistyped recipe or
    run directory is an error, not a silent fresh start. `--resume auto` (for preemptible jobs
    that always pass it) continues when it can and starts from scratch when there is nothing."""
    from peftkit.train import checkpoints

    if resume_arg is None:
        return False, force
    if force:
        raise RunDirError("--resume and --force contradict each other: --force deletes the run --resume would continue")
    if (run_dir / "summary.json").is_file():
        raise RunDirError(f"--resume: {run_dir} holds a finished run (summary.json); there is nothing to resume")
    if checkpoints.latest_loadable(run_dir) is not None:
        return True, False
    checkpoints.refuse_if_all_damaged(run_dir)  # not even `auto` starts over here: deleting them is the user's call
    started = run_dir.is_dir() and any(run_dir.iterdir())
    if resume_arg != "auto":
        if not started:
            raise RunDirError(
                f"--resume: there is no run to resume in {run_dir}; start it without --resume "
                "(or pass --resume auto to continue when a checkpoint exists and start fresh otherwise)"
            )
        raise RunDirError(
            f"--resume: {run_dir} has no complete checkpoint (checkpoints are written every train.save_steps steps, "
            "or each epoch); start it again with --force"
        )
    if started:
        log.warning("--resume: %s has no complete checkpoint yet; starting the run again from scratch", run_dir)
        return False, True
    return False, False


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues this run: the same one, with --resume instead of --force."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if a != "--force"]
    if "--resume" not in argv and not any(a.startswith("--resume=") for a in argv):
        argv.append("--resume")
    from peftkit.utils.command_name import command

    return command(*argv)


def restart_command(run_dir: Path, argv: list[str] | None = None) -> str:
    """The command line that starts this run again when nothing can be resumed: the same one without --resume (and
    its RUN_DIR / `auto` value), with --force where the stopped start left a folder behind."""
    given = list(sys.argv[1:] if argv is None else argv)
    kept = [arg for i, arg in enumerate(given)
            if arg != "--resume" and not arg.startswith("--resume=")
            and not (i > 0 and given[i - 1] == "--resume" and not arg.startswith("-") and "=" not in arg)]
    force = ["--force"] if run_dir.is_dir() and "--force" not in kept else []
    from peftkit.utils.command_name import command

    return command(*kept, *force)


# --------------------------------------------------------------------------------------------------
# The entry point behind `peftkit train`


def train_command(args: argparse.Namespace, console: Any) -> int:
    """Parse what to run; train here (one process, or as a launched worker) or launch the workers."""
    worker = is_worker()
    if worker:
        # torchrun starts workers with Ctrl-C ignored (the launching peftkit forwards it); restore it
        # before the slow imports, so a Ctrl-C during start-up stops the worker.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stop_if_interrupted_before_start()
    recipe, recipe_arg = load_train_recipe(args)
    run_dir = Path(recipe.output_dir).expanduser().resolve()
    if getattr(args, "resume", None) == "auto" and not worker and (run_dir / "summary.json").is_file():
        # A job that always passes --resume auto, started again after the run finished: nothing left to do,
        # unless its recipe was edited since (that recipe was never trained).
        from peftkit.train.run_dir import recipe_changes

        changed = recipe_changes(run_dir, recipe.model_dump(mode="json"))
        if changed:
            raise RunDirError(
                f"--resume auto: {run_dir} holds a finished run made from another recipe ({'; '.join(changed)}), so "
                "this recipe has not been trained. Train it into another output_dir, or replace that run with "
                "--force instead of --resume"
            )
        console.print(f"{run_dir} holds a finished run (summary.json): nothing to resume (--resume auto)", markup=False)
        return 0
    options = LaunchOptions.from_args(args)
    if not worker and not options.multi_process and options.problems():  # `--nproc 0` must not train quietly in one
        raise PeftkitError("; ".join(options.problems()))
    if options.multi_process and not worker:
        return launch(args, recipe, recipe_arg, options, console)
    if os.environ.get(WORKER_ENV):  # the launching peftkit resolved --resume and checked the run directory
        resume, force = getattr(args, "resume", None) is not None, bool(args.force)  # --force: its replacement
    else:
        _refuse_if_in_use(run_dir)  # before --resume's checks: a running run's checkpoints are still being written
        resume, force = resolve_resume(getattr(args, "resume", None), run_dir, bool(args.force))
    # imported only now: torch, transformers and trl take seconds (tens beside other work), which a run in use or
    # a recipe that cannot train should not cost
    from peftkit.train.report import print_run_report
    from peftkit.train.run import train
    from peftkit.train.signals import TrainingInterrupted

    try:
        result = train(recipe, resume=resume, force=force)
        finish_process_group()
    except TrainingInterrupted as exc:
        finish_process_group(wait=exc.coordinated)  # during training every rank stops at the same step
        if os.environ.get(WORKER_ENV):
            return 0  # the launching process reads interrupted.json and tells the user
        raise exc.with_command(resume_command(getattr(args, "argv", None))) from None
    if is_main_process() and not os.environ.get(WORKER_ENV):
        print_run_report(console, result.run_dir, result.summary)
    return 0


def _worker_argv(args: argparse.Namespace, recipe_arg: str, resume: bool, run_dir: Path, replace: bool = False) -> list[str]:
    argv = ["-v"] if getattr(args, "verbose", False) else []
    argv += ["train", recipe_arg, *(getattr(args, "overrides", None) or [])]
    if getattr(args, "deepspeed", None):
        value = args.deepspeed
        argv += ["--deepspeed", value if value.strip() in {"0", "1", "2", "3"} else str(Path(value).expanduser().resolve())]
    if resume:
        argv += ["--resume", str(run_dir)]
    elif replace:  # rank 0 replaces the earlier run once the new run's data has been read (peftkit/train/run.py)
        argv += ["--force"]
    return argv


def launcher_command(options: LaunchOptions, worker_argv: list[str]) -> list[str]:
    """torchrun (default) or the DeepSpeed launcher, running `python -m peftkit.cli <worker_argv>`."""
    if options.chosen_launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
        if options.hostfile:
            cmd += ["--hostfile", str(Path(options.hostfile).expanduser().resolve())]
        if options.nnodes > 1:
            cmd += ["--num_nodes", str(options.nnodes)]
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if not options.hostfile and visible and all(d.isdigit() for d in visible):
            # --num_gpus N would make DeepSpeed use GPUs 0..N-1 whatever CUDA_VISIBLE_DEVICES says
            cmd += ["--include", "localhost:" + ",".join(visible[: options.nproc])]
        elif options.nproc > 1 or not options.hostfile:
            cmd += ["--num_gpus", str(options.nproc)]
        if options.master_port is not None:
            port = options.master_port
        elif options.hostfile:
            port = 29500
        else:
            from peftkit.train.deepspeed import free_port

            port = free_port()  # one node: a free port, so concurrent runs do not collide
        # With a hostfile and no address DeepSpeed asks the first host for its own (`hostname -I`): 127.0.0.1 would
        # send every other node to itself.
        address = options.master_addr or (None if options.hostfile else "127.0.0.1")
        cmd += [*(["--master_addr", address] if address else []), "--master_port", str(port)]
        return [*cmd, "--no_local_rank", "--module", "peftkit.cli", *worker_argv]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(options.nproc)]
    if options.nnodes == 1 and not options.master_addr and options.master_port is None:
        cmd += ["--standalone"]  # a free local port: concurrent runs on one machine do not collide
    else:
        cmd += [
            "--nnodes", str(options.nnodes), "--node-rank", str(options.node_rank),
            "--master-addr", options.master_addr or "127.0.0.1", "--master-port", str(options.master_port or 29500),
        ]
    # Ctrl-C reaches the workers from the launching peftkit, once; torchrun itself must not act on it.
    cmd += ["--signals-to-handle", "SIGTERM,SIGHUP,SIGQUIT", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    return [*cmd, "-m", "peftkit.cli", *worker_argv]


def _die_with_parent() -> None:  # runs in the launcher child between fork and exec: keep it tiny
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: torchrun stops (and stops its workers) if we are killed


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


_PRCTL = _load_prctl()


def stop_if_interrupted_before_start() -> None:
    """In a worker, once its Ctrl-C handler is in place: the launcher's interrupt arrived before (INTERRUPT_FLAG_ENV)."""
    flag = os.environ.get(INTERRUPT_FLAG_ENV)
    if flag and Path(flag).exists():
        raise KeyboardInterrupt


class _Forwarder:
    """Ctrl-C / SIGTERM on the launching process -> the same signal to each worker (checkpoint, then stop; the run
    exits 130 or 143 and records which); a second one -> again (workers quit at once); a third -> SIGKILL.
    The first also writes `flag` (INTERRUPT_FLAG_ENV) for workers that start, or start listening, later."""

    def __init__(self, proc: subprocess.Popen[bytes], direct: bool, flag: Path | None = None) -> None:
        self.proc = proc
        self.direct = direct
        self.flag = flag
        self.count = 0
        self.last = 0.0

    def _targets(self) -> list[int]:
        if self.direct:
            return [self.proc.pid]
        try:
            import psutil

            return [child.pid for child in psutil.Process(self.proc.pid).children(recursive=False)]
        except Exception:  # psutil missing or the launcher already gone
            return []

    def __call__(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.count and now - self.last < 2.0:
            return  # the same interrupt seen twice
        self.count += 1
        self.last = now
        sig = signal.SIGKILL if self.count >= 3 else signum
        if self.count == 1:
            print("\nInterrupt: the workers save a checkpoint at the end of this step, then stop "
                  "(Ctrl-C again to stop them at once)", file=sys.stderr, flush=True)
            if self.flag is not None:
                self.flag.touch()  # before the signal: a worker checks it after installing its handler
        for pid in self._targets():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def run_supervised(cmd: list[str], env: dict[str, str], *, direct_signals: bool = False) -> tuple[int, int]:
    """Run the launcher; returns (exit code, number of interrupts forwarded)."""
    flag = Path(tempfile.gettempdir()) / f"peftkit-interrupt-{os.getpid()}-{time.monotonic_ns()}"
    env = {**env, INTERRUPT_FLAG_ENV: str(flag)}
    try:
        return _run_supervised(cmd, env, direct_signals, flag)
    finally:
        flag.unlink(missing_ok=True)


def _run_supervised(cmd: list[str], env: dict[str, str], direct_signals: bool, flag: Path) -> tuple[int, int]:
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if not direct_signals:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by torchrun: it must ignore Ctrl-C
    try:
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if _PRCTL else None)
    finally:
        signal.signal(signal.SIGINT, previous[signal.SIGINT])
    forward = _Forwarder(proc, direct_signals, flag)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.kill()
    return code, forward.count


FORWARDED_TO_NODES = ("PEFTKIT_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS",
                      "DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", "PYTORCH_CUDA_ALLOC_CONF")
"""Variables the workers on other nodes need: peftkit's worker flag and home, the Hugging Face cache / offline / token
settings, thread counts."""


def deepspeed_env_file(env: dict[str, str]) -> Path:
    """The DeepSpeed runner reaches other nodes through pdsh / ssh, which carries only a few variables (NCCL_*,
    PYTHON*, ...) and the lines of a `.deepspeed_env` file. This writes such a file (private: it may hold HF_TOKEN)
    with the user's own `~/.deepspeed_env` / `./.deepspeed_env` lines and `FORWARDED_TO_NODES`; the runner reads it
    through DS_ENV_FILE."""
    lines = []
    for folder in (Path.home(), Path.cwd()):
        own = folder / os.environ.get("DS_ENV_FILE", ".deepspeed_env")
        if own.is_file():
            lines += [line for line in own.read_text(encoding="utf-8").splitlines() if "=" in line]
    lines += [f"{key}={value}" for key, value in sorted(env.items())
              if key.startswith(FORWARDED_TO_NODES) and value and "\n" not in value]
    handle, path = tempfile.mkstemp(prefix="peftkit-deepspeed-env-", text=True)  # mode 0600
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    return Path(path)


def worker_threads(recipe: Recipe, device: str, nproc: int) -> int | None:
    """Each worker's thread count: the user's (train.num_threads, else OMP_NUM_THREADS); on a CPU without one, the free
    cores shared among the `nproc` processes (N processes x all cores would oversubscribe it). It reaches the ranks as
    OMP_NUM_THREADS, not as a recipe override: the run's recipe.yaml keeps no count the user did not set, which chat,
    eval and export would take for one."""
    threads = recipe.train.num_threads or cpu_threads.omp_threads()
    return cpu_threads_per_process(nproc) if device == "cpu" and threads is None else threads


def cpu_threads_per_process(nproc: int) -> int:
    """The CPUs free now (usable, less those other work keeps busy) shared among `nproc` CPU processes, one at least;
    said when other work takes some (each rank sees the others' threads, so the ranks cannot look themselves)."""
    cpus = cpu_threads.usable_cpus()
    busy = cpu_threads.busy_cpu(cpus)
    threads = max(1, cpu_threads.free_cpus(cpus, busy) // nproc)
    if busy is not None:
        share = "the cores free now" if busy.busy < cpus else "as no core is free now"
        log.warning("The CPU is busy (%s): each of the %d processes trains on %d thread%s, %s; set train.num_threads "
                    "to choose", busy.describe(), nproc, threads, "s" * (threads != 1), share)
    return threads


def worker_environment(recipe: Recipe, device: str, options: LaunchOptions, threads: int | None) -> dict[str, str]:
    from peftkit.train.deepspeed import extensions_dir

    from peftkit.utils.once import said_by_launcher_env

    env = dict(os.environ)
    env[WORKER_ENV] = "1"
    env.update(said_by_launcher_env())
    env.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def check_launch(recipe: Recipe, options: LaunchOptions) -> None:
    """The launch options, and what of the recipe cannot run in several processes (`train`, and `validate --nproc`)."""
    problems = options.problems()
    if recipe.task != "causal_lm":
        problems.append(f"multi-process training runs causal_lm recipes only so far (this one is {recipe.task}); drop --nproc")
    if getattr(recipe.adapter, "unfreeze_schedule", None) is not None:
        problems.append("adapter.unfreeze_schedule (gradual unfreezing) runs in one process only: DDP registers the "
                        "trainable parameters when it wraps the model, so blocks unfrozen later would drift apart "
                        "between processes; drop the schedule (train_last_layers trains a fixed set) or --nproc")
    if problems:
        raise LaunchError("; ".join(problems))


def check_process_count(recipe: Recipe, options: LaunchOptions) -> None:
    """A DeepSpeed `train_batch_size` against the processes the options start (with a hostfile they are known on the
    hosts only, where each worker checks: deepspeed.setup)."""
    if options.hostfile:
        return
    from peftkit.train.deepspeed import world_size_problems

    if problems := world_size_problems(recipe, options.nproc * options.nnodes):
        raise ConfigError(problems)


def launch(args: argparse.Namespace, recipe: Recipe, recipe_arg: str, options: LaunchOptions, console: Any) -> int:
    """Validate and prepare once, start the workers, and report what they did."""
    from peftkit.config.validate import validate_recipe
    from peftkit.train.run_dir import run_lock

    check_launch(recipe, options)
    recipe = validate_recipe(recipe, check_model=True)  # as the workers run it (a default length fitted): resume
    check_process_count(recipe, options)  # compares it with the run's stored recipe
    run_dir = Path(recipe.output_dir).expanduser().resolve()
    with run_lock(run_dir, enabled=options.node_rank == 0):  # held for the workers, which do not lock themselves
        return _launch(args, recipe, recipe_arg, options, console, run_dir)


def _launch(args: argparse.Namespace, recipe: Recipe, recipe_arg: str, options: LaunchOptions, console: Any,
            run_dir: Path) -> int:
    from peftkit.models import resolve_device
    from peftkit.train import deepspeed as ds
    from peftkit.train.report import print_run_report
    from peftkit.train.run_dir import check_run_dir
    from peftkit.train.signals import read_interrupted

    resume, force = resolve_resume(getattr(args, "resume", None), run_dir, bool(args.force))
    replace = False  # checked here, before any worker starts; the workers' rank 0 deletes only after reading the data
    if options.node_rank == 0:
        replace = check_run_dir(run_dir, resume=resume, force=force, recipe_dump=recipe.model_dump(mode="json"))
    if resume and not options.hostfile:  # the number of processes is known (with a hostfile, each worker checks)
        from peftkit.train import checkpoints

        checkpoints.check_resume_setup(run_dir, world_size=options.nproc * options.nnodes,
                                       deepspeed_stage=ds.zero_stage(recipe))
    device = resolve_device(recipe.train.device)
    env = worker_environment(recipe, device, options, worker_threads(recipe, device, options.nproc))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
    if ds.enabled(recipe) and device == "cpu":
        ds.ensure_cpu_ops_built()  # once, here, with a message; the workers then find it built
    else:
        ds.check_extension_locks()
    cmd = launcher_command(options, _worker_argv(args, recipe_arg, resume, run_dir, replace))
    log.info("Starting %d worker process(es) per node with %s%s", options.nproc, options.chosen_launcher,
             f", DeepSpeed ZeRO stage {ds.zero_stage(recipe)}" if ds.enabled(recipe) else " (DDP)")
    log.debug("Launch command: %s", shlex.join(cmd))
    started = time.time()
    env_file = deepspeed_env_file(env) if options.chosen_launcher == "deepspeed" and options.hostfile else None
    if env_file is not None:
        env["DS_ENV_FILE"] = str(env_file)
    try:
        code, interrupts = run_supervised(cmd, env, direct_signals=options.chosen_launcher == "deepspeed")
    finally:
        if env_file is not None:
            env_file.unlink(missing_ok=True)
    argv = getattr(args, "argv", None)  # cli.main(argv) in a notebook: not the kernel's sys.argv
    raise_for_worker_exit(code, interrupts, read_interrupted(run_dir, since=started - 1, argv=argv), run_dir, argv)
    if options.node_rank != 0:
        return 0
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise LaunchError(f"the workers exited without writing {summary_path}; see their output above")
    print_run_report(console, run_dir, json.loads(summary_path.read_text(encoding="utf-8")))
    return 0


def raise_for_worker_exit(code: int, interrupts: int, record: dict[str, Any] | None, run_dir: Path,
                          argv: list[str] | None = None) -> None:
    """Turn the launcher's exit code and the workers' interrupt record into what the user is told.

    A worker that saved its interrupt checkpoint can still die on the way out (C++ destructors of the
    communication libraries); when the checkpoint the record names is complete, the run is resumable and
    is reported as interrupted, not as lost."""
    from peftkit.train import checkpoints
    from peftkit.train.signals import TrainingInterrupted

    if record is not None:
        checkpoint = Path(record["checkpoint"])
        if code == 0 or checkpoints.is_complete(checkpoint):
            if code != 0:
                log.warning("A worker exited abnormally after the checkpoint was saved (launcher exit code %d); "
                            "the checkpoint is complete", code)
            raise TrainingInterrupted(int(record["step"]), checkpoint, run_dir, resume_command(argv), record.get("signal"))
    if interrupts and code == 0 and (run_dir / "summary.json").is_file():
        log.warning("The interrupt arrived as the run was finishing; it finished (summary.json is written)")
        return
    if interrupts:
        # an earlier session's checkpoint can be resumed; else the same command starts over
        again = resume_command(argv) if checkpoints.latest_loadable(run_dir) is not None else restart_command(run_dir, argv)
        error = LaunchError(f"training was interrupted before a checkpoint could be saved (launcher exit code {code}); "
                            f"rerun with: {again}")
        error.exit_code = 130  # interrupted, as a one-process run reports it
        raise error
    if code != 0:
        raise LaunchError(f"training failed in a worker process (launcher exit code {code}); the worker's error is above")


def _all_reduce_sum(values: tuple[float, ...], dtype: Any) -> list[float] | None:
    """The element-wise sum over all processes, or None when this is the only one."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(total)
    return total.tolist()


def sum_over_processes(*values: int) -> tuple[int, ...]:
    """Per-process counters (e.g. tokens trained) summed over all processes; every rank must call it."""
    import torch

    total = _all_reduce_sum(values, torch.int64)
    return tuple(values) if total is None else tuple(int(v) for v in total)


def mean_over_processes(value: float) -> float:
    """A per-process number (e.g. the loss since the last log) averaged over all processes; every rank calls it."""
    import torch
    import torch.distributed as dist

    total = _all_reduce_sum((value,), torch.float64)
    return value if total is None else total[0] / dist.get_world_size()


def finish_process_group(wait: bool = True) -> None:
    """Wait for every rank (unless `wait` is False: ranks that did not stop together would wait forever), then
    tear the process group down before interpreter exit.

    Left to exit-time destructors, gloo's and DeepSpeed's communication threads can still be joinable
    when C++ static destruction runs, and a worker that finished training aborts ("terminate called
    without an active exception"). Only called where all ranks arrive: after a normal end, and after a
    coordinated interrupt stop (a second Ctrl-C raises KeyboardInterrupt and never gets here)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
    global _process_group_finished
    _process_group_finished = True


_process_group_finished = False


def leave_worker_now(code: int) -> None:
    """A worker whose process group is torn down leaves with `os._exit`, after Python's own exit work.

    `destroy_process_group` still leaves gloo's and DeepSpeed's C++ threads to static destruction, and under load a
    rank that had finished and written everything sometimes aborted there ("terminate called without an active
    exception"), failing the whole launch. Non-daemon threads are joined and the exit handlers, logging and the
    standard streams run and flushed here first, as at a normal exit, so nothing the run wrote is lost; only the C++
    destructors are skipped. Returns (does nothing) in a
    process that is not a launched worker, or whose process group was not torn down."""
    global _process_group_finished
    if not (_process_group_finished and is_worker()):
        _process_group_finished = False  # a later command in this process starts afresh
        return
    import atexit
    import threading

    threading._shutdown()  # type: ignore[attr-defined]  # what the interpreter does first: join non-daemon threads
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)
