"""What every ``cortexflow`` command shares: the consoles, the error and warning lines (every
:class:`~cortexflow.errors.CortexFlowError` becomes one red ``error: ...`` line on stderr and exit code 2),
the help texts naming models and backends, and the parsers of option values (model config, state, images,
prompt ids, dtype, model detection)."""

import functools
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import typer
from rich.console import Console
from rich.text import Text

from cortexflow.cli_options import backend_names, parse_model_option
from cortexflow.config import (
    FLOW_MATCHING_MODELS,
    IMAGE_PROMPT_MODELS,
    TOKEN_DECODING_MODELS,
    VLAModelType,
    dtype_name,
    is_auto,
    model_names,
)
from cortexflow.errors import (
    ConfigError,
    CortexFlowError,
    CortexFlowWarning,
    InputError,
)

MODELS_HELP = model_names(IMAGE_PROMPT_MODELS)


ALL_MODELS_HELP = model_names()


FLOW_HELP = model_names(FLOW_MATCHING_MODELS)


TOKEN_HELP = model_names(TOKEN_DECODING_MODELS)


BACKENDS_HELP = backend_names()


EXIT_PROBLEMS = 1


EXIT_ERROR = 2


IMAGE_SUFFIXES_PIL = (".png", ".jpg", ".jpeg")


def stdout_console() -> Console:
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal:  # pipes and test runners: do not squeeze tables into 80 columns
        console = Console(highlight=False, width=max(console.width, 120))
    return console


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def error_line(message: str) -> None:
    """One red line on stderr (rich markup in the message is not interpreted)."""
    stderr_console().print(Text("error: " + " ".join(message.split()), style="bold red"))


def warning_line(message: str) -> None:
    stderr_console().print(Text("warning: " + " ".join(message.split()), style="yellow"))


def cli_errors(func: Callable) -> Callable:
    """Turn CortexFlowError into ``error: ...`` + exit 2, and CortexFlowWarning into ``warning: ...`` lines."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CortexFlowWarning)
                try:
                    return func(*args, **kwargs)
                except CortexFlowError as err:
                    error_line(str(err) or type(err).__name__)
                    raise typer.Exit(EXIT_ERROR) from None
        finally:
            _replay_warnings(caught)

    return wrapper


def _replay_warnings(caught: list) -> None:
    """Show the warnings a command recorded, once each, after recording has stopped.

    Replaying inside ``catch_warnings(record=True)`` would append every replayed warning to the list
    being iterated, so the loop would never end."""
    for item in caught:
        if issubclass(item.category, CortexFlowWarning):
            warning_line(str(item.message))
        else:
            warnings.showwarning(item.message, item.category, item.filename, item.lineno)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def human_count(n: int) -> str:
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= limit:
            return f"{n:,} ({n / limit:.2f}{suffix})"
    return f"{n:,}"


def parse_model_config(value: Optional[str]) -> Optional[dict]:
    """``--model-config``: a JSON object, or the path of a JSON file holding one (ModelConfig field overrides)."""
    if value is None:
        return None
    text = value.strip()
    source = "--model-config"
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"--model-config {value!r} is neither a JSON object nor an existing JSON file"
            )
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read --model-config file {path}: {err}") from err
        source = str(path)
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{source} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a JSON object of ModelConfig fields, got {type(data).__name__}")
    return data


def parse_number_list(value: str, option: str, kind: type) -> list:
    items = [item.strip() for item in value.replace(";", ",").split(",")]
    if value.strip().startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError as err:
            raise InputError(f"{option} {value!r} is not a valid JSON list: {err}") from err
        if not isinstance(parsed, list):
            raise InputError(f"{option} must be a list of numbers, got {value!r}")
        items = [str(v) for v in parsed]
    if not items or any(item == "" for item in items):
        raise InputError(f"{option} {value!r} has an empty entry; expected comma-separated numbers like '1,2,3'")
    out = []
    for item in items:
        try:
            out.append(kind(item))
        except ValueError:
            what = "an integer token id" if kind is int else "a number"
            raise InputError(f"{option}: {item!r} is not {what}") from None
    return out


def parse_prompt_tokens(value: Optional[str]) -> Optional[np.ndarray]:
    """``--prompt-tokens "2,15,7"`` -> int64 ids."""
    if value is None:
        return None
    return np.asarray(parse_number_list(value, "--prompt-tokens", int), dtype=np.int64)


def load_state(state: Optional[str], state_file: Optional[Path]) -> Optional[np.ndarray]:
    """``--state "0.1,0.2"`` or ``--state-file`` (.npy array, or .json list / {"state": [...]})."""
    if state is not None and state_file is not None:
        raise InputError("pass either --state or --state-file, not both")
    if state is not None:
        return np.asarray(parse_number_list(state, "--state", float), dtype=np.float32)
    if state_file is None:
        return None
    path = Path(state_file).expanduser()
    if not path.is_file():
        raise InputError(f"state file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                if "state" not in data:
                    raise InputError(f"state file {path} holds a JSON object without a 'state' entry")
                data = data["state"]
        else:
            raise InputError(f"state file {path} has suffix {suffix!r}; expected .npy or .json")
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read state file {path}: {err}") from err
    try:
        return np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InputError(f"state file {path} does not hold a list of numbers: {err}") from err


def load_image(path: Path) -> np.ndarray:
    """One HWC image from ``.npy`` (uint8 or float in [-1, 1]) or, with Pillow installed, PNG/JPEG (RGB uint8)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"image file {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"image path {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read image {path} as a .npy array: {err}") from err
    if suffix in IMAGE_SUFFIXES_PIL:
        try:
            from PIL import Image
        except ImportError:
            raise InputError(
                f"reading {suffix} image {path} needs Pillow, which is not installed: pip install pillow, "
                "or save the image as an HWC uint8 .npy file (numpy.save)"
            ) from None
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
        except Exception as err:  # Pillow raises several types for unreadable files
            raise InputError(f"cannot read image {path}: {err}") from err
    raise InputError(f"image {path} has suffix {suffix!r}; expected .npy (HWC uint8 or float) or .png/.jpg/.jpeg")


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU; else the name, validated."""
    from cortexflow.config import resolve_dtype as compute_dtype
    from cortexflow.engine import resolve_device

    return dtype_name(compute_dtype(dtype, resolve_device(device)))


def detect_model(checkpoint: Path, model: str, model_config: Optional[dict]) -> VLAModelType:
    """``--model auto`` -> the type found in the checkpoint's tensors; else the parsed name, which must
    agree with the tensors (rt2 reads the PaliGemma part of a pi0/pi05 checkpoint)."""
    from cortexflow.checkpoints.openvla_layout import inspect_any_checkpoint

    auto = is_auto(model)
    model_type = None if auto else parse_model_option(model, IMAGE_PROMPT_MODELS, command="run")
    if model_type == VLAModelType.RT2:
        return model_type
    found = inspect_any_checkpoint(checkpoint, None if model_type == VLAModelType.OPENVLA else model_config).model_type
    if model_type is not None and found != model_type:
        raise ConfigError(f"--model {model}: {checkpoint} holds a {found.value} model (detected from its tensors); "
                          f"pass --model {found.value} or --model auto")
    return found


def refuse_demo_name(checkpoint: Path, where: str) -> None:
    """``demo`` names no folder here (serve and export build it on the fly): say how to get one."""
    if str(checkpoint) == "demo" and not checkpoint.exists():
        raise ConfigError(f"{where} needs a checkpoint folder; 'demo' is not one here: `cortexflow demo --save DIR` "
                          "writes the demo model as a folder (weights, config, tokenizer, norm stats) to pass instead")


def progress_line(message: str) -> None:
    stderr_console().print(Text(message, style="dim"))


def parse_switches(value: str, option: str) -> list:
    """``"on,off"`` -> ``[True, False]`` (also true/false, yes/no, 1/0)."""
    words = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
    items = [item.strip().lower() for item in value.split(",")]
    bad = [item for item in items if item not in words]
    if bad or not items:
        raise InputError(f"{option} {value!r}: expected a comma-separated list of on/off")
    return [words[item] for item in items]


def write_report(report: dict, json_path: Optional[str], print_tables: Callable) -> None:
    """Tables on stdout and the JSON file, or (``--json -``) only the JSON on stdout."""
    if json_path == "-":
        typer.echo(json.dumps(report, indent=2))
        return
    print_tables(report, stdout_console())
    if json_path:
        path = Path(json_path).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))
        except OSError as err:
            raise InputError(f"cannot write the JSON report to {path}: {err}") from err
        stderr_console().print(Text(f"wrote {path}", style="dim"))
