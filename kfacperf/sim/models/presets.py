"""Model preset names -> TOML files under ``models/<kind>/``.

``resolve("devices", "h100")`` gives ``models/devices/h100-sxm5.toml``; anything that looks
like a path (contains a path separator or ends in ``.toml``) is taken as a path.  The models
folder is the repository's ``models/`` unless ``KFACPERF_MODELS`` names another one.
"""
from __future__ import annotations

import os
from pathlib import Path

from kfacperf.safety import regular_file

KINDS: tuple[str, ...] = ("workloads", "devices", "clusters", "convergence")
_SINGULAR = {"workload": "workloads", "device": "devices", "cluster": "clusters"}

ALIASES: dict[str, dict[str, str]] = {
    "workloads": {"resnet-20": "resnet20", "resnet-32": "resnet32", "resnet-50": "resnet50"},
    "devices": {
        "v100": "v100-sxm2", "a100": "a100-sxm4", "h100": "h100-sxm5", "h200-sxm": "h200",
        "cpu": "local-cpu",
    },
    "clusters": {
        "abci": "abci-v100", "dgx-a100": "dgx-a100-hdr", "dgx-h100": "dgx-h100-ndr",
        "local": "local-cpu",
    },
    "convergence": {},
}


def models_dir() -> Path:
    """The folder holding ``workloads/``, ``devices/``, ``clusters/`` and ``convergence/``."""
    env = os.environ.get("KFACPERF_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "models"


def _kind(kind: str) -> str:
    kind = _SINGULAR.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; kinds: {', '.join(KINDS)}")
    return kind


def _noun(kind: str) -> str:
    """``devices`` -> ``device``; ``convergence`` stays."""
    return {v: k for k, v in _SINGULAR.items()}.get(kind, kind)


def list_presets(kind: str) -> list[str]:
    """Preset names available for ``kind`` (file stems under ``models/<kind>/``)."""
    folder = models_dir() / _kind(kind)
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def looks_like_path(name: str) -> bool:
    return name.endswith(".toml") or os.sep in name or "/" in name


def resolve(kind: str, name_or_path: str | os.PathLike[str]) -> Path:
    """The TOML file for a preset name, alias or path (errors name what was looked for); a
    path object is always a path."""
    kind = _kind(kind)
    text = os.fspath(name_or_path)
    if not text:
        raise ValueError(f"empty {_noun(kind)} model name")
    if isinstance(name_or_path, os.PathLike) or looks_like_path(text):
        return regular_file(text, what=f"{_noun(kind)} model file",
                            hint=f"give the path of a {_noun(kind)} model .toml file (e.g. "
                                 f"models/{kind}/NAME.toml) or a preset name")
    name = ALIASES[kind].get(text.lower(), text)
    path = models_dir() / kind / f"{name}.toml"
    if not path.is_file():
        known = list_presets(kind)
        aliases = [f"{a} -> {t}" for a, t in ALIASES[kind].items() if t in known]
        raise ValueError(
            f"unknown {_noun(kind)} preset {text!r} (looked for {path}); presets: "
            f"{', '.join(known) or '(none)'}"
            + (f"; aliases: {', '.join(aliases)}" if aliases else "")
            + "; or give a path to a .toml file"
        )
    return path


def check_model_out(path: str | os.PathLike[str], *, force: bool, flag: str = "--out") -> Path:
    """Check that a model TOML may be written at ``path``: a new file, or with ``force`` an
    existing one (a committed preset under ``models/`` is named as such in the refusal)."""
    from kfacperf.safety import check_output_file

    p = Path(path)
    note = ""
    if p.exists():
        committed = models_dir().resolve()
        if committed in p.resolve().parents:
            note = f"a committed preset under {committed}"
    return check_output_file(p, force=force, flag=flag, note=note)
