"""Command line: `python -m mctlib {experts,convexify,distill,evaluate,check} ...`.

Every config field has a flag, generated from the dataclasses in `config.py`; the command's own
config is unprefixed (`--syn-steps`), the others carry a prefix (`--net-width`, `--eval-epochs`,
`--data-zca`). Values come from, in order: the defaults, `--preset NAME`, `--config FILE` (JSON
with sections data/net/expert/distill/eval), then explicit flags. Everything is validated before
any work starts; an error names the flag and the allowed range.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import sys
import warnings
from pathlib import Path

import torch

from .config import (
    FLOAT32_MAX,
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExpertConfig,
    LimitError,
    check_limits,
    get_preset,
    presets,
)
from .data import DATASET_INFO, load_data
from .device import PRECISIONS, compute_identity, configure_threads, resolve_device, versions
from .networks import NetConfig, build_network
from .rundir import (
    CONFIG,
    CheckpointError,
    FolderBusyError,
    RunFolder,
    SyntheticSetError,
    check_out,
    config_differences,
    folder_lock,
    listed,
    read_synthetic,
)
from .sources import DatasetError
from .storage import DestinationError, StoreError, atomic_write_json, check_destination, load_store, save_convexified

SECTIONS = {"data": DataConfig, "net": NetConfig, "expert": ExpertConfig, "distill": DistillConfig, "eval": EvalConfig}
FLAG_PREFIX = {"data": "data-", "net": "net-", "expert": "expert-", "distill": "", "eval": "eval-"}


class _Parser(argparse.ArgumentParser):
    """argparse reads "-1e-7" as a flag (its negative-number pattern has no exponent); this one reads
    every negative number as a value, and reports a bad value in one line with a pointer to --help
    (no usage block). Subcommand parsers are made of the same class."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _seconds(text: str) -> float:
    """--dist-timeout: seconds, positive and at most 1e9 (about 30 years: what a timedelta holds, and more)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1e9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in (0, 1e9]")
    return value


def _parse_optional(kind):
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


def _add_section(parser: argparse.ArgumentParser, section: str, primary: bool) -> None:
    cls = SECTIONS[section]
    group = parser.add_argument_group(f"{section} settings" + ("" if primary else f" (prefix --{FLAG_PREFIX[section]})"))
    prefix = "" if primary else FLAG_PREFIX[section]
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        if section == "data" and f.name == "name":
            flag = "--dataset"
        dest = f"{section}.{f.name}"
        kind = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"(default {default!r})"
        if kind.startswith("bool"):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        elif kind.startswith("tuple"):
            item = int if kind.startswith("tuple[int") else str
            group.add_argument(flag, dest=dest, nargs="+", type=item, default=argparse.SUPPRESS, help=help_text)
        else:
            base = {"int": int, "float": float, "str": str}[kind.split()[0].split("|")[0]]
            parse = _parse_optional(base) if "None" in kind else base
            group.add_argument(flag, dest=dest, type=parse, default=argparse.SUPPRESS, metavar=base.__name__.upper(),
                               help=help_text)


def _flag_for(section: str, field: str, primary: str) -> str:
    if section == "data" and field == "name":
        return "--dataset"
    return "--" + ("" if section == primary else FLAG_PREFIX[section]) + field.replace("_", "-")


def build_configs(args: argparse.Namespace, sections: list[str], primary: str,
                  parser: argparse.ArgumentParser) -> dict:
    """Defaults <- preset <- --config file <- flags; invalid values become parser errors naming the flag."""
    values: dict[str, dict] = {s: {} for s in SECTIONS}
    preset = getattr(args, "preset", None)
    if preset:
        try:
            p = get_preset(preset)
        except ValueError as err:
            parser.error(str(err))
        for s in SECTIONS:
            values[s] = getattr(p, s).to_dict()
    config_file = getattr(args, "config", None)
    args.config_values = {}
    if config_file:
        try:
            loaded = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            parser.error(f"--config {config_file}: cannot read JSON ({err})")
        if not isinstance(loaded, dict) or not all(isinstance(d, dict) for d in loaded.values()):
            parser.error(f"--config {config_file}: expected an object of sections, each an object of settings")
        args.config_values = loaded
        for s, d in loaded.items():
            if s not in SECTIONS:
                parser.error(f"--config {config_file}: unknown section {s!r}; sections: {sorted(SECTIONS)}")
            values[s].update(d)
    for key, value in vars(args).items():
        if "." in key:
            s, name = key.split(".", 1)
            values[s][name] = value
    if not preset and "net" in sections:
        _fit_net_to_data(values, args)
    configs = {}
    for s in sections:
        try:
            configs[s] = SECTIONS[s].from_dict(values[s])
            if s == "net":  # NetConfig lives below config.py, so it cannot check its limits itself
                check_limits(configs[s])
        except LimitError as err:  # the value's words, with the flag that set it
            parser.error(f"{_flag_for(s, err.field, primary)} {err.shown} {err.reason}")
        except (ValueError, TypeError) as err:
            message = str(err)
            match = re.search(r"(\w+Config)\.(\w+)", message)
            if match:
                sec = next(k for k, v in SECTIONS.items() if v.__name__ == match.group(1))
                message = f"{_flag_for(sec, match.group(2), primary)}: {message}"
            parser.error(message)
    if "net" in configs:
        _check_net_size(configs["net"], primary, parser)
    return configs


def _check_net_size(net: NetConfig, primary: str, parser) -> None:
    """A network whose parameters alone exceed this machine's memory, refused before it is built (its
    shape is worked out on torch's meta device, which allocates nothing)."""
    flags = ", ".join(_flag_for("net", f, primary) for f in ("width", "depth"))
    try:
        with torch.device("meta"):
            numel = sum(p.numel() for p in build_network(net).parameters())
    except RuntimeError as err:  # sizes whose product overflows 64 bits
        parser.error(f"the network's size cannot even be computed ({str(err).splitlines()[0]}); lower {flags}")
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: nothing to compare against
        return
    if 4 * numel > memory:
        parser.error(f"the network has {numel:.3g} parameters ({4 * numel / 2**30:.3g} GiB), more than this "
                     f"machine's {memory / 2**30:.3g} GiB of memory; lower {flags}")


def _fit_net_to_data(values: dict, args) -> None:
    """Without a preset, shape the network to the dataset (channels, classes, image size)."""
    name = values["data"].get("name", "digits")
    if name in DATASET_INFO:
        info = DATASET_INFO[name]
        channels, classes = info.channels, info.num_classes
        size = values["data"].get("image_size") or info.image_size
        for field, value in (("channels", channels), ("num_classes", classes), ("image_size", size)):
            values["net"].setdefault(field, value)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="a named preset (list them with `mctlib presets`)")
    parser.add_argument("--config", help="JSON file with sections data/net/expert/distill/eval")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32 (default, no TF32), tf32 (CUDA tensor cores) or bf16 (autocast); recorded "
                             "with the device in the outputs, and checked by `mctlib check`")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--dist-backend", default="auto", choices=("auto", "nccl", "gloo"),
                        help="under torchrun: auto (nccl on GPUs, gloo on CPUs), nccl, gloo")
    parser.add_argument("--dist-timeout", type=_seconds, default=None,
                        help="under torchrun: seconds a rank waits for the others before stopping (default "
                             "$MCTLIB_DIST_TIMEOUT or 1800)")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mctlib", description="Matching Convexified Trajectory dataset distillation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("experts", help="train experts and record their trajectories")
    _common(p)
    p.add_argument("--out", required=True, help="folder for the trajectory store (must not hold one)")
    p.add_argument("--ensemble-size", type=int, default=8, help="experts trained at once (vmap; >= 1; fewer use "
                   "less memory)")
    for s in ("expert", "data", "net"):
        _add_section(p, s, s == "expert")

    p = sub.add_parser("convexify", help="turn a store of full buffers into convexified records")
    p.add_argument("--store", required=True, help="a store of full buffers (from `experts --record full`)")
    p.add_argument("--out", required=True, help="folder for the convexified store")
    p.add_argument("--num-waypoints", type=int, default=4, help="K (2: the single segment theta_0 -> theta_E)")
    p.add_argument("--beta-schedule", default="arc_length", choices=("arc_length", "uniform", "projected"))
    p.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--store-theta0", action=argparse.BooleanOptionalAction, default=True,
                   help="store theta_0 (--no-store-theta0: regenerate it from the init seed)")

    p = sub.add_parser("distill", help="distill a synthetic set by trajectory matching")
    _common(p)
    p.add_argument("--store", required=True, help="trajectory store made by `experts` or `convexify`")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    for s in ("distill", "eval", "data"):
        _add_section(p, s, s == "distill")

    p = sub.add_parser("evaluate", help="train fresh networks on a synthetic set or a baseline")
    _common(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", help="synthetic_best/final.safetensors from a distill run")
    source.add_argument("--baseline", choices=("random_real", "full"), help="evaluate a baseline instead")
    p.add_argument("--ipc", type=int, default=None, help="images per class of the random_real baseline (default 10)")
    p.add_argument("--lr", type=float, default=None, help="lr for the baselines (default 0.01; a synthetic set "
                   "trains with its learned alpha)")
    p.add_argument("--out", required=True, help="folder for metrics.json")
    for s in ("eval", "data", "net"):
        _add_section(p, s, s == "eval")

    p = sub.add_parser("check", help="check the engine on a device against CPU float64, and time it", add_help=False)
    p.add_argument("check_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("presets", help="list the named presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["check"]:  # the acceptance check has its own parser: hand it everything after the command
        from .check import main as check_main

        return check_main(argv[1:])
    parser = make_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the command as given, for the one that continues a diverged run
    if args.command != "presets":
        try:
            configure_threads()
        except ValueError as err:  # a bad $MCTLIB_THREADS
            parser.error(str(err))
    if args.command == "presets":
        for name, p in sorted(presets().items()):
            d = p.distill
            print(f"{name:24s} ipc {d.ipc:3d} syn_steps {d.syn_steps:3d} expert_epochs {d.expert_epochs:g} "
                  f"max_start {d.max_start_epoch:g} lr_img {d.lr_img:g} lr_lr {d.lr_lr:g}  {p.note}")
        return 0
    command = {"experts": _experts, "convexify": _convexify, "distill": _distill, "evaluate": _evaluate}[args.command]
    if args.command != "convexify":  # checked with or without torchrun, as every other value
        from .distributed import DistributedError, timeout_seconds

        try:
            timeout_seconds(args.dist_timeout)
        except DistributedError as err:
            _subparser(parser, args.command).error(f"--dist-timeout: {err}")

    def note(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"mctlib {args.command}: note: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = note   # a notice is one line of the command's output, not a source line
            args.group = _join_ranks(args)
            return command(args, parser)
    except _user_errors() as err:  # a problem with the user's files or data: its message says what to do
        print(f"mctlib {args.command}: error: {err}{_continue_hint(args, err)}", file=sys.stderr)
        return 1
    except OSError as err:  # the file system refused (permissions, a full disk): its own message names the path
        print(f"mctlib {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "out of memory" not in str(err) and "can't allocate" not in str(err):
            raise
        size = re.search(r"allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", str(err))
        print(f"mctlib {args.command}: error: out of memory{' (tried to allocate ' + size.group(1) + ')' if size else ''}"
              "; use smaller sizes (--ipc, --batch-size, --ensemble-size, --net-width, --eval-batch-size) or a "
              "device with more memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = "; `--resume` continues from its last checkpoint" if args.command == "distill" else ""
        print(f"mctlib {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        if getattr(args, "group", None) is not None:
            from .distributed import teardown

            teardown()


def _continue_hint(args, err) -> str:
    """For a diverged distill run: the exact command that continues it with a lower step size."""
    from .distill import DivergenceError

    if args.command != "distill" or not isinstance(err, DivergenceError) or not err.field:
        return ""
    flag = "--" + err.field.replace("_", "-")
    kept, skip = [], False
    for word in args.argv:
        if skip:
            skip = False
        elif word == flag:
            skip = True
        elif word != "--resume" and not word.startswith(flag + "="):
            kept.append(word)
    return f"; to continue from it: python -m mctlib {shlex.join(kept)} --resume {flag} {err.suggested:g}"


def _join_ranks(args):
    """The process group when torchrun started this process (see distributed.py), else None."""
    from .distributed import launched, setup

    if args.command == "convexify" or not launched():
        return None
    return setup(args.device, args.dist_backend, args.dist_timeout)


def _user_errors() -> tuple[type[Exception], ...]:
    """The library's own errors, each raised with a message that names the fix."""
    from .distributed import DistributedError

    # FloatingPointError: a divergence (distill, evaluation, expert training), each naming the step size to lower.
    return (StoreError, DatasetError, CheckpointError, FloatingPointError, DestinationError, DistributedError,
            FolderBusyError, SyntheticSetError)


def _device(args, sp):
    """The --device, checked before any work (a missing GPU is one line, not a traceback)."""
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        sp.error(f"--device {args.device}: {err}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        sp.error(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA GPU(s); use cuda:0 .. "
                 f"cuda:{torch.cuda.device_count() - 1}, or --device cpu")
    if args.precision == "tf32" and device.type != "cuda":
        sp.error(f"--precision tf32 uses CUDA tensor cores; on {device.type} it would compute and record fp32 as "
                 "tf32: use --precision fp32 (or bf16)")
    return device


def _destination(args, sp) -> Path:
    try:
        check_destination(args.out)
    except DestinationError as err:
        sp.error(str(err))
    return Path(args.out)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _load_data(cfg: DataConfig, group=None):
    def load():
        return load_data(cfg)

    if group is None:
        return load()
    # Under torchrun the first rank of each node loads (and downloads) first, the others then read its files.
    data = load() if group.local_rank == 0 else None
    group.barrier("the loading of the dataset (the first rank of a node failed to load it)")
    return data if data is not None else load()


def _out_folder(args, sp, wants: str):
    """--out checked (writable, not holding another kind of output) and locked: the writer's lock, taken
    before anything is computed, so a second writer stops at once. Ranks other than 0 only check."""
    out = _destination(args, sp)
    writer = args.group is None or args.group.writer
    lock = folder_lock(out) if writer else None
    if lock is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock.__enter__()
    try:
        check_out(out, wants, getattr(args, "resume", False))
    except CheckpointError as err:
        if lock is not None:
            lock.__exit__(None, None, None)
        sp.error(str(err))
    return out, lock


def _experts(args, parser) -> int:
    sp = _subparser(parser, "experts")
    c = build_configs(args, ["expert", "data", "net"], "expert", sp)
    if args.ensemble_size < 1:
        sp.error(f"--ensemble-size {args.ensemble_size} must be >= 1 (experts trained at once)")
    device = _device(args, sp) if args.group is None else args.group.device
    if args.group is not None and args.precision != "fp32":  # distributed experts train in fp32 (their manifest says so)
        sp.error(f"--precision {args.precision} is not available for experts on torchrun ranks; use fp32")
    out, lock = _out_folder(args, sp, "store")  # before training: a folder that cannot be written would lose it all
    try:
        from .experts import make_experts

        data = _load_data(c["data"], args.group)
        _check_net_data(sp, c["net"], data)
        if args.group is not None:
            from .distributed import make_experts as make_experts_on_ranks

            store = make_experts_on_ranks(data, c["net"], c["expert"], out, args.group, args.ensemble_size,
                                          progress=not args.no_progress and args.group.writer)
            if not args.group.writer:
                return 0
        else:
            store = make_experts(data, c["net"], c["expert"], out, device=device, progress=not args.no_progress,
                                 ensemble_size=args.ensemble_size, precision=args.precision)
    except FloatingPointError as err:  # the training loop's words, with the flag that sets its step size
        lr = c["expert"].lr
        raise FloatingPointError(f"expert {str(err).split(';')[0]}; lower --lr (now {lr:g}), e.g. "
                                 f"{float(f'{lr / 10:.3g}'):g}") from err
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    stats = store.manifest["stats"]
    acc = stats["test_accuracy"]
    print(f"{len(acc)} experts ({store.kind} records) in {stats['seconds']:.1f}s, test accuracy "
          f"{100 * sum(acc) / len(acc):.2f}%, {store.bytes_per_expert / 1e6:.3f} MB per expert -> {out}")
    return 0


def _check_net_data(sp, net: NetConfig, data) -> None:
    if (net.channels, net.image_size, net.num_classes) != (data.channels, data.image_size[0], data.num_classes):
        sp.error(f"the network expects {net.channels}x{net.image_size}x{net.image_size} images and {net.num_classes} "
                 f"classes, the dataset has {data.channels}x{data.image_size[0]}x{data.image_size[1]} and "
                 f"{data.num_classes}; set --net-channels/--net-image-size/--net-num-classes or --data-image-size")


def _convexify(args, parser) -> int:
    sp = _subparser(parser, "convexify")
    args.group = None
    _destination(args, sp)
    store = load_store(args.store)
    if store.kind != "full":
        sp.error(f"--store {args.store} holds {store.kind} records; convexify needs full buffers")
    if not 2 <= args.num_waypoints <= store.records[0].epochs + 1:
        sp.error(f"--num-waypoints {args.num_waypoints} must lie in [2, {store.records[0].epochs + 1}]")
    out, lock = _out_folder(args, sp, "store")
    try:
        save_convexified(store, out, args.num_waypoints, args.beta_schedule, args.smooth, args.store_theta0)
    finally:
        lock.__exit__(None, None, None)
    new = load_store(out)
    print(f"{len(store.records)} experts: {store.bytes_per_expert / 1e6:.3f} MB -> {new.bytes_per_expert / 1e6:.3f} MB "
          f"per expert ({store.bytes_per_expert / new.bytes_per_expert:.1f}x smaller) -> {out}")
    return 0


def _distill(args, parser) -> int:
    """Each thing checked once, on the way in: values (build_configs), --out, the device, the store's
    manifest and files (load_store), then the folder (locked, run or not); the library checks the
    store against the data and the method (distill._check_store)."""
    sp = _subparser(parser, "distill")
    c = build_configs(args, ["distill", "eval", "data"], "distill", sp)
    from .distill import distill

    out = _destination(args, sp)
    device = _device(args, sp) if args.group is None else args.group.device
    if out.resolve() == Path(args.store).resolve():
        sp.error(f"--out {out} is the store (--store {args.store}); give the run a folder of its own")
    try:
        store = load_store(args.store)
    except StoreError as err:
        sp.error(str(err))
    _check_store_net(args, store, sp)
    try:  # locked by the writer, then checked: of two runs started together, one runs and one is refused
        folder = RunFolder.open(out, args.resume, writes=args.group is None or args.group.writer)
    except CheckpointError as err:
        sp.error(str(err))
    try:
        data = _load_data(c["data"], args.group)
        result = distill(c["distill"], store, data, c["eval"], folder, resume=args.resume, device=device,
                         progress=not args.no_progress, run_info={"command": sys.argv, "preset": args.preset},
                         group=args.group, precision=args.precision)
    except ValueError as err:
        sp.error(str(err))
    finally:
        folder.close()
    if args.group is not None and not args.group.writer:
        return 0
    for change in result.step_size_changes:
        print(f"{change['field']} {change['from']:g} -> {change['to']:g} from iteration {change['iteration']} "
              "(recorded in metrics.json)")
    if result.best:
        print(f"best: {100 * result.best['mean']:.2f} +- {100 * result.best['std']:.2f}% at iteration "
              f"{result.best['iteration']}; final: {100 * result.final['mean']:.2f} +- {100 * result.final['std']:.2f}%")
    print(f"alpha {result.alpha:.5g}; run -> {out}")
    return 0


def _check_store_net(args, store, sp) -> None:
    """distill uses the store's network. A --config file that sets another is refused; a preset whose
    network differs gets one line saying which is used."""
    stored = store.net.to_dict()
    asked = args.config_values.get("net") or {}
    diff = [f"{k}: --config {v!r} vs store {stored.get(k)!r}" for k, v in asked.items() if stored.get(k) != v]
    if diff:
        sp.error(f"--store {store.path} was recorded with another network than --config {args.config} sets "
                 f"({'; '.join(diff)}); distill uses the store's, so drop the net section or use another store")
    if args.preset:
        preset_net = get_preset(args.preset).net.to_dict()
        diff = [f"{k} {stored[k]!r} (preset {preset_net[k]!r})" for k in stored if preset_net.get(k) != stored[k]]
        if diff:
            print(f"mctlib distill: note: --store {store.path} was recorded with network {', '.join(diff)}; "
                  "the store's network is used", file=sys.stderr)


def _settings_of_set(args, c: dict, synthetic, sp) -> dict:
    """A synthetic set is evaluated on the network and data it was distilled for, which its checksummed
    file holds, unless --preset or --config say otherwise. A config.json beside it that disagrees is
    refused: one of the two was altered."""
    settings = synthetic.settings
    beside = Path(args.synthetic).parent / CONFIG
    if beside.exists():
        try:
            run = json.loads(beside.read_text())
            diff = config_differences({"net": run.get("net"), "dataset": run.get("dataset")},
                                      {"net": settings["net"], "dataset": settings["dataset"]},
                                      left="config.json", right="synthetic set")
        except (OSError, ValueError, AttributeError) as err:
            diff = [f"unreadable ({err})"]
        if diff:
            sp.error(f"{beside} disagrees with the settings {args.synthetic} was distilled with "
                     f"({listed(diff)}); restore config.json or evaluate a copy of the set on its own")
    if args.preset or args.config:
        return c
    explicit = {k.split(".", 1)[1] for k in vars(args) if k.startswith(("net.", "data."))} - {"root", "download"}
    if explicit:
        sp.error(f"{args.synthetic} holds the network and data it was distilled for; they are used, so drop "
                 f"{sorted(explicit)} (or pass --preset/--config to override them)")
    data = settings["dataset"]
    return {**c, "net": NetConfig.from_dict(settings["net"]),
            "data": c["data"].replace(name=data["name"], image_size=data["image_size"][0], zca=data["zca"])}


def _evaluate(args, parser) -> int:
    sp = _subparser(parser, "evaluate")
    c = build_configs(args, ["eval", "data", "net"], "eval", sp)
    if args.synthetic and (args.lr is not None or args.ipc is not None):
        sp.error(f"{'--lr' if args.lr is not None else '--ipc'} is for the baselines; a synthetic set trains with "
                 "its own learned lr alpha and images: drop it")
    lr, ipc = args.lr if args.lr is not None else 0.01, args.ipc if args.ipc is not None else 10
    if not (math.isfinite(lr) and 0 < lr <= FLOAT32_MAX):
        sp.error(f"--lr {lr} must be a finite number > 0 that float32 holds (the baselines' learning rate)")
    if ipc < 1:
        sp.error(f"--ipc {ipc} must be >= 1 (images per class of the random_real baseline)")
    device = _device(args, sp) if args.group is None else args.group.device
    share = args.group
    from .evaluate import EvaluationDivergedError, evaluate_synthetic, full_data_baseline, random_real_baseline

    if args.synthetic:
        try:
            synthetic = read_synthetic(args.synthetic)
        except SyntheticSetError as err:
            sp.error(str(err))
        c = _settings_of_set(args, c, synthetic, sp)
    out, lock = _out_folder(args, sp, "evaluation")
    try:
        data = _load_data(c["data"], args.group)
        _check_net_data(sp, c["net"], data)
        try:  # each checks its training set (shape, labels, lr) before training anything
            if args.synthetic:
                results = evaluate_synthetic(synthetic.images, synthetic.labels, synthetic.alpha, data, c["net"],
                                             c["eval"], device, share=share, precision=args.precision)
                source = {"synthetic": args.synthetic, "alpha": synthetic.alpha}
            elif args.baseline == "random_real":
                results = random_real_baseline(data, ipc, c["net"], c["eval"], lr=lr, seed=c["eval"].seed,
                                               device=device, share=share, precision=args.precision)
                source = {"baseline": "random_real", "ipc": ipc, "lr": lr}
            else:
                results = full_data_baseline(data, c["net"], c["eval"], lr=lr, device=device, share=share,
                                             precision=args.precision)
                source = {"baseline": "full", "lr": lr}
        except EvaluationDivergedError as err:
            if args.synthetic:
                raise EvaluationDivergedError(f"{str(err).split('; lower')[0]}; its learned lr alpha = "
                                              f"{synthetic.alpha:.3g} is too high for these networks", err.lr) from err
            raise EvaluationDivergedError(str(err).replace("lower the learning rate", "lower --lr"), err.lr) from err
        except ValueError as err:
            sp.error(str(err))
        if share is not None and not share.writer:
            return 0
        for r in results:
            print(r)
        atomic_write_json(out / "metrics.json", {"source": source, "results": [r.to_dict() for r in results],
                                                 "config": {s: c[s].to_dict() for s in c},
                                                 "versions": versions(device),
                                                 "compute": compute_identity(device, args.precision),
                                                 "command": sys.argv})
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
