"""Policies by CLI name: ``NAME`` or ``NAME:field=value:field=value``.

`parse` builds a policy from such a spec: NAME is a policy's CLI name (`kv_compression.policies`) or
``infokv-calibrated`` (InfoKV with the model's calibrated settings); ``infokv-calibrated``,
``learned`` and ``distilled`` read the model's file (`kv_compression.tuned`); ``kvpress:CLASS[:field=value...]`` is a
kvpress press's choice (`kv_compression.kvpress`, an extra);
each ``field=value`` sets one field of the policy's dataclass, converted to the field's type
(integers, numbers, ``true``/``false``, or one of an option's choices, checked by the policy). An
unknown name or field is an `InputError` naming the choices.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from forward_influence.errors import InputError

from .policies import POLICIES, Policy
from .policies.kvpress_scores import KvpressScores
from .tuned import calibrated, distilled, learned

CALIBRATED = "infokv-calibrated"
LEARNED = "learned"
DISTILLED = "distilled"
KVPRESS = "kvpress"
PER_MODEL = (CALIBRATED, LEARNED, DISTILLED)  # built from a file of the model's: checked once the model is known


def policy_names() -> list[str]:
    """Every CLI policy name."""
    return [*POLICIES, CALIBRATED, KVPRESS]


def field_value(where: str, kind: type, text: str) -> object:
    """A field's value from the text of ``field=value``, converted to its type `kind` (bool: true or
    false; int; float; ``Annotated`` types by their base; anything else stays text); `where` names the
    field in the error."""
    base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind
    if base is bool:
        if text.lower() not in ("true", "false"):
            raise InputError(f"{where} must be true or false, got {text!r}")
        return text.lower() == "true"
    if base not in (int, float):
        return text
    try:
        return base(text)
    except ValueError:
        raise InputError(f"{where} must be {'an integer' if base is int else 'a number'}, got {text!r}") from None


def parse(spec: str, model: str | None = None, quiet: bool = False) -> Policy:
    """The policy a spec names (see the module docstring); `model` picks the calibration."""
    name, *assignments = [part.strip() for part in spec.split(":")]
    if name not in policy_names():
        raise InputError(f"unknown policy {name!r}; choose from {', '.join(policy_names())}")
    if name == KVPRESS:  # kvpress:CLASS[:field=value...], checked against the installed kvpress
        from . import kvpress

        kvpress.press_class(":".join(assignments))
        return KvpressScores(press=":".join(assignments))
    note = None  # which file a per-model policy came from: said once the whole spec is valid
    if name == CALIBRATED:
        base, note = calibrated(model or "")
    elif name == LEARNED:
        base, note = learned(model or "")
    elif name == DISTILLED:
        base, note = distilled(model or "")
    else:
        base = POLICIES[name]()
    cls = type(base)
    known = [f.name for f in dataclasses.fields(cls)]
    changes = {}
    for assignment in assignments:
        field, equals, text = assignment.partition("=")
        if not equals or field not in known:
            raise InputError(
                f"{spec!r}: {assignment!r} is not FIELD=VALUE with a field of {name} ({', '.join(known) or 'none'})"
            )
        changes[field] = field_value(
            f"{cls.name}: {field}", typing.get_type_hints(cls, include_extras=True)[field], text
        )
    policy = dataclasses.replace(base, **changes) if changes else base
    if note and not quiet:
        print(note, file=sys.stderr)
    return policy
