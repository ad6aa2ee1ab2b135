"""Which transformers releases hf_yoco supports (checked at `import hf_yoco`, before any model code is imported).

Policy: the `transformers` range declared in `pyproject.toml` is exactly what CI tests. Its lower bound is the oldest
release CI runs (the generation / cache / PEFT / remote-code tests, `pytest -m transformers_compat`); its upper bound
is the next minor release not yet tested, so a fresh install months from now still resolves a tested transformers.
`import hf_yoco` checks the installed release against that range (read from the package metadata, one source of
truth) and refuses others with a clear message instead of silently generating wrong tokens. Set
`HF_YOCO_SKIP_TRANSFORMERS_CHECK=1` to turn the refusal into a warning when trying a release CI has not seen.

transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`. The models accept
both names; `hf_yoco.CACHE_NAME`, `hf_yoco.output_cache` and `hf_yoco.cache_kwarg` (defined in
`hf_yoco.models.modeling_common`, so they travel with checkpoints as remote code) give user code one spelling for
every supported release:

    out = model.generate(ids, return_dict_in_generate=True)
    cache = hf_yoco.output_cache(out)                     # out.cache (>= 5.24) or out.past_key_values (5.23)
    model.generate(out.sequences, **hf_yoco.cache_kwarg(cache), max_new_tokens=8)   # continue from it
"""

from __future__ import annotations

import os
import warnings
from importlib import metadata

import transformers
from packaging.requirements import Requirement
from packaging.version import Version

SKIP_CHECK_ENV = "HF_YOCO_SKIP_TRANSFORMERS_CHECK"


def supported_transformers() -> Requirement | None:
    """The `transformers` requirement declared by the installed hf-yoco distribution (None when hf_yoco runs from a
    source tree that was never installed, so there is no metadata to read)."""
    try:
        requirements = metadata.requires("hf-yoco") or []
    except metadata.PackageNotFoundError:
        return None
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "transformers" and requirement.marker is None:
            return requirement
    return None


def check_transformers_version(installed: str | None = None) -> None:
    """Raise `ImportError` when the installed transformers is outside the supported range (a warning instead when
    `HF_YOCO_SKIP_TRANSFORMERS_CHECK=1`)."""
    requirement = supported_transformers()
    installed = installed or transformers.__version__
    if requirement is None or requirement.specifier.contains(Version(installed), prereleases=True):
        return
    lower_bound_first = ",".join(sorted(map(str, requirement.specifier), key=lambda spec: not spec.startswith(">")))
    message = (
        f"hf_yoco supports transformers {lower_bound_first} (the releases its CI tests); found transformers "
        f"{installed}. Install a supported release, e.g. `pip install 'transformers{lower_bound_first}'`, or set "
        f"{SKIP_CHECK_ENV}=1 to try this one anyway (cache handling changes between releases can silently change "
        "generated tokens)."
    )
    if os.environ.get(SKIP_CHECK_ENV, "") not in ("", "0"):
        warnings.warn(message, stacklevel=2)
        return
    raise ImportError(message)


check_transformers_version()

__all__ = ["SKIP_CHECK_ENV", "check_transformers_version", "supported_transformers"]
