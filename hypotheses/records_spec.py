"""The grammar the record classes are written in, and the checks it gives them.

A record class (``hypotheses/records.py``) is a frozen keyword-only dataclass, one per
recorded result. Each field says where its value lives in a ``fixtures.recording.Record``
(numbers, arrays, prompts or the verdict), its key there, its spec (a type, an object's
keys, a list's or an array's dimensions) and what it means. The spec is data, so one
checker, one writer and one schema renderer serve every class.

Reading is lenient: a record may lack fields (a hand-made one, or a result whose stage did not
record them; the report then shows n/a), but every field that is there must match its spec, and named dimensions
(``layer``, ``head``, ``prompt``...) must agree across the record's lists and arrays.
Writing is strict: every field that is not optional is there, and no key is left
undocumented, so a new number needs a field (and with it a line in reports/SCHEMA.md).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from fixtures.recording import Record
from instruments import components as C
from instruments.stats import Estimate

PARTS = ("numbers", "arrays", "prompts", "verdict")


class RecordError(ValueError):
    """A recorded result does not match its record class; the message names the result, the field and
    what was found there."""


def _found(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, Mapping):
        return f"an object with keys {sorted(map(str, value))[:8]}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"{type(value).__name__} {repr(value)[:60]}"


@dataclass(frozen=True, kw_only=True)
class Check:
    """One pass over one record: its name, the mode, and the sizes its named dimensions took."""

    result: str
    strict: bool
    sizes: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)

    def fail(self, at: str, expected: str, value: Any = None, *, found: str | None = None) -> None:
        raise RecordError(f"{self.result}: {at} should be {expected}, found {found or _found(value)}")

    def size(self, dim: str, n: int, at: str) -> None:
        # the same named dimension has one size across the record (e.g. every [layer, head] array)
        seen = self.sizes.setdefault(dim, (n, at))
        if seen[0] != n:
            raise RecordError(f"{self.result}: {at} has {n} along '{dim}', but {seen[1]} has {seen[0]}")


class Spec:
    """What a value must be; ``text`` is how reports/SCHEMA.md writes it."""

    def check(self, value: Any, at: str, c: Check) -> None:
        raise NotImplementedError

    def text(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Scalar(Spec):
    kind: str  # int | float | str | bool
    choices: tuple[str, ...] = ()

    def check(self, value: Any, at: str, c: Check) -> None:
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "str": isinstance(value, str), "bool": isinstance(value, bool)}[self.kind]
        if not ok or (self.choices and value not in self.choices):
            c.fail(at, self.text(), value)

    def text(self) -> str:
        return " | ".join(f'"{x}"' for x in self.choices) if self.choices else self.kind


@dataclass(frozen=True)
class Null(Spec):
    """The inner spec, or null (JSON's null: undefined, not measured)."""

    inner: Spec

    def check(self, value: Any, at: str, c: Check) -> None:
        if value is not None:
            self.inner.check(value, at, c)

    def text(self) -> str:
        return f"{self.inner.text()} or null"


@dataclass(frozen=True)
class AnyJson(Spec):
    def check(self, value: Any, at: str, c: Check) -> None:
        return None

    def text(self) -> str:
        return "any JSON"


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    dim: str | None = None  # a named dimension: its length agrees with arrays' and other lists' of that name

    def check(self, value: Any, at: str, c: Check) -> None:
        if not isinstance(value, list):
            c.fail(at, self.text(), value)
        if self.dim:
            c.size(self.dim, len(value), at)
        for i, x in enumerate(value):
            self.item.check(x, f"{at}[{i}]", c)

    def text(self) -> str:
        return f"[{self.item.text()}" + (f"; one per {self.dim}]" if self.dim else "]")


@dataclass(frozen=True)
class MapOf(Spec):
    """An object of arbitrary keys (e.g. one per harm category), each value one spec."""

    value: Spec
    key: str = "name"

    def check(self, value: Any, at: str, c: Check) -> None:
        if not isinstance(value, Mapping):
            c.fail(at, self.text(), value)
        for k, v in value.items():
            self.value.check(v, f"{at}[{k!r}]", c)

    def text(self) -> str:
        return f"{{<{self.key}>: {self.value.text()}}}"


@dataclass(frozen=True)
class Key:
    """A key of an :class:`Obj`: an optional key may be absent from any record; a writer must record
    every other key (a lenient reader tolerates its absence)."""

    spec: Spec
    optional: bool = False


def optional(spec: Spec) -> Key:
    return Key(spec, optional=True)


def _keyed(spec: Spec | Key) -> Key:
    return spec if isinstance(spec, Key) else Key(spec)


@dataclass(frozen=True)
class Obj(Spec):
    """An object with named keys. ``closed``: a strict check rejects keys it does not name."""

    keys: Mapping[str, Spec | Key]
    name: str = ""  # how SCHEMA.md names it instead of spelling its keys (e.g. "estimate")
    closed: bool = False

    def check(self, value: Any, at: str, c: Check) -> None:
        if not isinstance(value, Mapping):
            c.fail(at, self.text(), value)
        for k, raw in self.keys.items():
            key = _keyed(raw)
            if k in value:
                key.spec.check(value[k], f"{at}.{k}", c)
            elif c.strict and not key.optional:
                c.fail(f"{at}.{k}", key.spec.text(), found="nothing (the key is missing)")
        extra = sorted(set(value) - set(self.keys))
        if c.strict and self.closed and extra:
            c.fail(at, f"{self.text()} with no other keys", found=f"extra keys {extra}")

    def text(self) -> str:
        if self.name:
            return self.name

        def one(k: str, key: Key) -> str:
            mark = "?" if key.optional else ""
            return f"{k}{mark}: {key.spec.text()}"
        return "{" + ", ".join(one(k, _keyed(v)) for k, v in self.keys.items()) + "}"


@dataclass(frozen=True)
class Component(Spec):
    """``instruments.components.to_json(c)``; a strict check parses it back."""

    def check(self, value: Any, at: str, c: Check) -> None:
        if not isinstance(value, Mapping) or not isinstance(value.get("kind"), str):
            c.fail(at, "a component {kind, ...}", value)
        if c.strict:
            try:
                C.from_json(dict(value))
            except (C.UnknownComponentError, TypeError, ValueError) as err:
                c.fail(at, "a component instruments.components.from_json can read", found=f"{value} ({err})")

    def text(self) -> str:
        return "component"


@dataclass(frozen=True)
class Tensor(Spec):
    """An array of the record (a torch tensor); dims are names (sizes agree across the record) or
    fixed ints; ``<member>`` in a name stands for the array's member of a family."""

    dims: tuple[str | int, ...]

    def of_member(self, member: str) -> "Tensor":
        """This spec for one member of a family: ``<member>`` in a dimension's name becomes the member."""
        return Tensor(tuple(d.replace("<member>", member) if isinstance(d, str) else d for d in self.dims))

    def check(self, value: Any, at: str, c: Check) -> None:
        if not isinstance(value, torch.Tensor):
            c.fail(at, f"a tensor {self.text()}", value)
        if value.dim() != len(self.dims):
            c.fail(at, f"a rank-{len(self.dims)} tensor {self.text()}", value)
        for dim, n in zip(self.dims, value.shape):
            if isinstance(dim, int):
                if n != dim:
                    c.fail(at, f"a tensor {self.text()}", value)
            else:
                c.size(dim, int(n), at)

    def text(self) -> str:
        return "[" + ", ".join(map(str, self.dims)) + "]"


INT, FLOAT, STR, BOOL = Scalar("int"), Scalar("float"), Scalar("str"), Scalar("bool")
ANY = AnyJson()
COMPONENT = Component()
# An estimate is instruments.stats.Estimate.to_dict(): non-finite numbers are written as null.
_EST_TYPES = {"float": Null(FLOAT), "float | None": Null(FLOAT), "int": INT, "str": STR}
EST = Obj({f.name: _EST_TYPES[f.type] for f in dataclasses.fields(Estimate)}, name="estimate", closed=True)


@dataclass(frozen=True, kw_only=True)
class Part:
    """Where one field of a record class lives in a Record and what it is (the field's metadata)."""

    part: str  # numbers | arrays | prompts | verdict
    spec: Spec
    doc: str
    key: str = ""  # its key in the part (default: the field's name); a family's pattern, e.g. "pca.<member>"
    optional: bool = False  # may be absent from any record (the writer records it only sometimes)
    needed: bool = False  # a reader cannot use the record without it, even leniently

    @property
    def family(self) -> bool:
        return "<member>" in self.key

    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.key).replace(re.escape("<member>"), "(?P<member>[^.]+)") + "$")


def _field(part: str, spec: Spec, doc: str, *, key: str = "", optional: bool = False, needed: bool = False) -> Any:
    meta = Part(part=part, spec=spec, doc=doc, key=key, optional=optional, needed=needed)
    # an optional field may be left out when building one; every other field must be given
    extra = {"default": None} if optional else {}
    return dataclasses.field(metadata={"record": meta}, **extra)


def number(spec: Spec, doc: str, **kw: Any) -> Any:
    return _field("numbers", spec, doc, **kw)


def array(dims: tuple[str | int, ...], doc: str, **kw: Any) -> Any:
    return _field("arrays", Tensor(dims), doc, **kw)


def prompt_list(doc: str, dim: str = "prompt", **kw: Any) -> Any:
    return _field("prompts", ListOf(STR, dim=dim), doc, key="prompts", **kw)


def verdict(spec: Spec, doc: str, **kw: Any) -> Any:
    return _field("verdict", spec, doc, **kw)


def _as_written(numbers: Mapping[str, Any]) -> Any:
    # what a reader gets back: fixtures.storage.atomic_write_json writes with default=str,
    # so a numpy integer would come back as a string
    return json.loads(json.dumps(numbers, default=str))


@dataclass(frozen=True, kw_only=True)
class Result:
    """A recorded result. Subclasses set NAME (a result name, or a pattern such as ``verdicts/*``)
    and declare their fields with :func:`number`, :func:`array`, :func:`prompt_list`, :func:`verdict`."""

    NAME: ClassVar[str] = ""

    @classmethod
    def parts(cls) -> tuple[tuple[str, Part], ...]:
        out = []
        for f in dataclasses.fields(cls):
            meta = f.metadata["record"]
            out.append((f.name, meta if meta.key else dataclasses.replace(meta, key=f.name)))
        return tuple(out)

    @classmethod
    def from_record(cls, record: Record, *, strict: bool = False) -> "Result":
        """The typed result of a Record; RecordError when it does not match (see the module's doc)."""
        c = Check(result=record.name, strict=strict)
        sources = {"numbers": record.numbers, "arrays": record.arrays, "verdict": record.verdict,
                   "prompts": {"prompts": list(record.prompts)} if record.prompts else {}}
        for part in ("numbers", "verdict"):
            if sources[part] is not None and not isinstance(sources[part], Mapping):
                c.fail(part, "an object", sources[part])
        used: dict[str, set[str]] = {p: set() for p in PARTS}
        values = {}
        for name, p in cls.parts():
            source = sources[p.part] or {}
            at = f"{p.part}[{p.key!r}]"
            if p.family:
                members = {m["member"]: v for k, v in source.items() if (m := p.pattern().match(k))}
                used[p.part] |= {p.key.replace("<member>", m) for m in members}
                for member, v in members.items():
                    p.spec.of_member(member).check(v, f"{p.part}[{p.key.replace('<member>', member)!r}]", c)
                value = members or None
            elif p.key in source:
                used[p.part].add(p.key)
                value = source[p.key]
                p.spec.check(value, at, c)
            else:
                value = None
            if value is None and p.key not in source and (p.needed or (strict and not p.optional)):
                c.fail(at, f"{p.spec.text()} ({name})", found="nothing (it is missing)")
            values[name] = value
        if strict:
            for part in PARTS:
                extra = sorted(set(sources[part] or {}) - used[part])
                if extra:
                    raise RecordError(f"{record.name}: {part} {extra} are not fields of {cls.__name__}: add a field "
                                      "in hypotheses/records_*.py (it documents the key in reports/SCHEMA.md) or stop "
                                      "recording it")
        return cls(**values)

    def to_record(self) -> dict[str, Any]:
        """Keyword arguments of ``Recorder.save``: numbers, arrays, prompts and (for a verdict) verdict."""
        out: dict[str, Any] = {"numbers": {}, "arrays": {}, "prompts": [], "verdict": None}
        for name, p in self.parts():
            value = getattr(self, name)
            # an absent value is left out; a null that the spec allows is written as null
            if value is None and (p.optional or not isinstance(p.spec, Null)):
                continue
            if p.part == "prompts":
                out["prompts"] = list(value)
            elif p.family:
                out[p.part].update({p.key.replace("<member>", m): v for m, v in value.items()})
            else:
                if p.part == "verdict" and out["verdict"] is None:
                    out["verdict"] = {}
                out[p.part][p.key] = value
        return out

    def as_record(self, name: str | None = None) -> Record:
        """This result as a Record (unsaved), as a reader would load it."""
        return written(name or self.NAME, **self.to_record())


def written(name: str, numbers: Mapping[str, Any] | None = None, arrays: Mapping[str, Any] | None = None,
            prompts: list[str] | None = None, verdict: Mapping[str, Any] | None = None) -> Record:
    """The Record a reader would load after ``Recorder.save(name, ...)`` of these parts."""
    return Record(name=name, key="", numbers=_as_written(numbers or {}), prompts=list(prompts or []),
                  verdict=None if verdict is None else _as_written(verdict), arrays=dict(arrays or {}),
                  recorded_at="")


def checked(cls: type[Result], name: str, **parts: Any) -> Result:
    """What ``Recorder.save(name, **parts)`` would write, read back strictly through ``cls`` (RecordError if it
    cannot be read)."""
    return cls.from_record(written(name, **parts), strict=True)
