"""What the commands share: the one-line error, the engine a command runs on, and a run's identity (the
problems, the model and its precision, the program, the session settings) read from the flags."""

from __future__ import annotations

from pathlib import Path


# the methods of a comparison, in the order commands run and report them (`whole` only for a sharded user)
METHOD_ORDER = ("whole", "single", "retry", "pe", "ttt", "pe-then-ttt", "rosa2")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def engine_for(args):
    from rosa2_dspy.engine import LocalEngine

    _, _, prepack = check_prepack(args)  # before the model loads
    # the setting resolved, not None: a shared engine another command of this process unpacked is packed again
    return LocalEngine.shared(args.model, device=args.device, dtype=args.dtype,
                              continuous=args.batching == "continuous", prepack=prepack)


def ray_workers(args, program: str, kwargs: dict, solver: str, threads: int, **options):
    """The Ray actors a ``--ray`` run shards its items over (None without ``--ray``): each builds the run's
    model (device and dtype as resolved here), program and solver (:mod:`rosa2_dspy.distributed`)."""
    if not getattr(args, "ray", None):
        return None
    if args.ray_actors < 1 or args.ray_cpus <= 0:
        raise CLIError("--ray-actors must be >= 1 and --ray-cpus > 0")
    from rosa2_dspy.distributed import RayError, RayWorkers, Workload

    path, sep, name = program.partition(":")
    identity = model_identity(args)
    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    workload = Workload(model=model, program=str(Path(path).resolve()) + sep + name, solver=solver,
                        device=identity["device"], dtype=identity["dtype"], batching=args.batching,
                        prepack=check_prepack(args)[2],  # as resolved here, whatever a worker's host would pick
                        program_kwargs=kwargs, options=options,
                        compiled=str(Path(args.compiled).resolve()) if getattr(args, "compiled", None) else None)
    try:
        return RayWorkers(workload, address=None if args.ray == "local" else args.ray, actors=args.ray_actors,
                          threads=threads, cpus=args.ray_cpus)
    except RayError as exc:
        raise CLIError(str(exc)) from None


def program_kwargs(args) -> dict:
    kwargs = {}
    if getattr(args, "clarify", False):
        kwargs["clarify"] = True
    if getattr(args, "adapter", None):
        kwargs["adapter"] = args.adapter
    return kwargs


# what a float32 run folder whose config.json predates session 30 served: plain weights (one that asked for
# --prepack holds prepack: true), so that it resumes with --no-prepack and is refused packed weights
LEGACY_MODEL_IDENTITY = {"prepack": False}


def check_prepack(args) -> tuple[str, object, bool]:
    """The device, dtype and prepacking ``args`` resolve to (``--prepack``/``--no-prepack``, else the engine's
    default there); a ``--prepack`` they cannot serve is refused (CLIError)."""
    from rosa2_dspy.engine.prepack import default_for, refusal
    from rosa2_dspy.models import pick_device, pick_dtype

    device = pick_device(getattr(args, "device", "auto"))
    dtype = pick_dtype(device, getattr(args, "dtype", "auto"))
    asked = getattr(args, "prepack", None)
    if asked and (reason := refusal(device, dtype)):
        raise CLIError(f"--prepack: {reason}: drop --prepack")
    return device, dtype, default_for(device, dtype) if asked is None else bool(asked)


def model_identity(args) -> dict:
    """The model, the precision and device it runs in, resolved (``auto`` differs between machines: a run
    resumed where bf16 is not native would mix float32 answers into a bf16 run), and the batching (rows batched
    differently round differently). ``--prepack`` where the weights cannot be packed is refused here; in float32
    prepacked weights (the default on a CPU with oneDNN) round differently, so a float32 run says which weights it
    served (in bf16 they change no output, and no identity; a folder from before the key existed served what
    :data:`LEGACY_MODEL_IDENTITY` says)."""
    import torch

    device, dtype, prepack = check_prepack(args)
    identity = {"model": args.model, "device": device.split(":")[0], "dtype": str(dtype).removeprefix("torch."),
                "batching": getattr(args, "batching", None)}
    if dtype == torch.float32:
        identity["prepack"] = prepack
    return identity


def data_identity(args) -> dict:
    """Everything that selects the problems of a run: part of a run folder's identity."""
    data_sha256 = None
    if args.data_file and Path(args.data_file).is_file():
        import hashlib

        with open(args.data_file, "rb") as handle:
            data_sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"split": args.split, "data_file": str(Path(args.data_file).resolve()) if args.data_file else None,
            "data_sha256": data_sha256, "input_field": args.input_field, "answer_field": args.answer_field,
            "subject": args.subject, "level": args.level, "ids": args.ids, "seed": args.seed,
            "shuffle": not args.no_shuffle, "limit": args.limit}


def compile_overlap(seen: list[str], examples: list, allow: bool, what: str) -> int:
    """How many of ``examples`` a compile trained or validated on (``seen``: their ids); refused unless allowed."""
    overlap = sorted({e.unique_id for e in examples} & set(seen))
    if overlap and not allow:
        raise CLIError(f"{len(overlap)} of the {len(examples)} problems were seen by {what} (training or validation), "
                       f"e.g. {overlap[0]}: evaluate on other problems, or pass --allow-overlap")
    return len(overlap)


def seen_by(meta: dict) -> list[str]:
    return list(meta.get("train_ids") or []) + list(meta.get("val_ids") or [])


def apply_session_recipe(args) -> None:
    """``--method path.toml``: the recipe's [session] table sets the method and its settings."""
    if not args.method or not args.method.endswith(".toml"):
        return
    from rosa2_dspy.recipes import RecipeError, read_tables

    path = Path(args.method)
    if not path.is_file():
        raise CLIError(f"no session recipe at {path}")
    try:
        table = read_tables(path)[0].get("session") or {}
    except RecipeError as exc:
        raise CLIError(str(exc)) from None
    from rosa2_dspy.experiments import SESSION_SETTINGS

    known = {"method", "user", *SESSION_SETTINGS}
    unknown = sorted(set(table) - known)
    if unknown or "method" not in table:
        raise CLIError(f"{path}: [session] needs 'method' and knows {', '.join(sorted(known))}; "
                       f"unknown: {', '.join(unknown) or '-'}")
    from rosa2_dspy.experiments import setting_value

    for key, value in table.items():
        try:
            setattr(args, key, setting_value(key, value) if key in SESSION_SETTINGS else value)
        except ValueError as exc:
            raise CLIError(f"{path}: {exc}") from None


def check_compiled_adapter(meta: dict, args) -> None:
    """A compiled artifact's adapter (every block, float32) is the engine's adapter: the updates of a run from it
    cannot be shaped otherwise (an engine's adapter is shaped once)."""
    from rosa2_dspy.experiments import ADAPTER_SHAPE, session_defaults

    defaults = session_defaults()
    if meta.get("adapter") and any(getattr(args, k, defaults[k]) != defaults[k] for k in ADAPTER_SHAPE):
        flags = " and ".join("--" + k.replace("_", "-") for k in ADAPTER_SHAPE)
        raise CLIError(f"{flags} shape the engine's adapter, and a compiled artifact with weights brings its own: "
                       "leave them at their defaults with --compiled")


def session_identity(args) -> dict:
    """The session settings of a run (checked): part of its folder's identity."""
    from rosa2_dspy.coadapt import POLICIES
    from rosa2_dspy.experiments import SESSION_SETTINGS

    if getattr(args, "method", None) and args.method not in POLICIES:
        raise CLIError(f"unknown method {args.method!r}; choose from: {', '.join(POLICIES)} or a recipe .toml")
    if args.turns < 1 or args.samples < 0 or args.update_steps < 1 or args.update_batch < 2:
        raise CLIError("--turns >= 1, --samples >= 0, --update-steps >= 1 and --update-batch >= 2 are needed")
    from rosa2_dspy.math.users import USERS

    if args.user not in USERS:
        raise CLIError(f"unknown --user {args.user!r}; choose from: {', '.join(USERS)}")
    values = {name: getattr(args, name) for name in SESSION_SETTINGS}
    from rosa2_dspy.experiments import session_configs

    try:  # a bad value (--lora-layers 0: UpdateConfig's UpdateError) stops here, before a run folder is made
        session, update = session_configs(values, max_tokens=getattr(args, "max_tokens", 1024))
        if getattr(args, "method", None):
            from rosa2_dspy.coadapt import check_policy_settings

            check_policy_settings(POLICIES[args.method], session)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    # each setting as the configs hold it (--reply-tail 0 is the whole reply, None, as a folder from before has it)
    configs = {"session": session, "update": update}
    return {"user": args.user, **{name: getattr(configs[s.config], s.field) for name, s in SESSION_SETTINGS.items()
                                  if s.identity}}


def train_val(args) -> tuple[list, list]:
    from rosa2_dspy.math.data import load_examples

    if args.limit is None or args.limit < 1:
        raise CLIError("--limit must be given and >= 1 (compiling is slow on a CPU: start with 8-16 problems)")
    if args.val_limit < 0 or args.threads < 1:
        raise CLIError("--val-limit must be >= 0 and --threads >= 1")
    examples = load_examples(args.split, data_file=args.data_file, input_field=args.input_field,
                             answer_field=args.answer_field, subjects=args.subject, levels=args.level,
                             ids=args.ids, limit=args.limit + args.val_limit,
                             seed=None if args.no_shuffle else args.seed)
    trainset, valset = examples[:args.limit], examples[args.limit:]
    if not trainset:
        raise CLIError("no problems match the given split and filters")
    return trainset, valset
