"""Extension tables: the one registry type behind every extension point of mari_fx.

Every table (op rules, lowerings, structured-value builders, row gathers, input kinds,
batch types, request kinds, example summaries, leaf modules, audit probe types) is a
:class:`Registry` with the same policy:

* **Priority.** Entries carry an explicit integer ``priority``; a lookup yields them highest
  first.  Callers try them in that order: a rule or lowering that returns ``None`` defers to
  the next one.  Among equal priorities, the entries of extensions come before the core's,
  and later registrations before earlier ones.
* **Duplicates.** One entry per ``(key, priority)`` in a table: adding a second raises
  :class:`~mari_fx.errors.RegistrationError` unless ``override=True``, which replaces it
  (the documented way to change a built-in behaviour; a higher priority adds one in front).
* **Classes follow the MRO.** A key that is a class matches its subclasses, the most
  derived registered class first -- except that a subclass which defines its own
  ``forward`` is a different op: lookup stops there (``class MyLinear(nn.Linear)`` gets the
  Linear rule and lowering; a subclass that rewrites ``forward`` gets neither, hence MIXED).
* **Predicate tables** (:meth:`Registry.matching`) key entries by a predicate on a value.

Extensions are objects (:class:`Extension`, cf. TorchRec's ``sharders=[...]``): a bundle of
entries for these tables, active while ``mari_fx.transform(..., extensions=[ext])`` runs (and
wherever a transformed module is used: ``pairs_to_request``, ``verify``, ``export``), or
everywhere once :func:`install`-ed.  ``import torchrec_integration`` installs its extension
for the common case.  ``mari_fx.analysis.rules.register`` and the other ``register_*`` functions add
to the core tables, as before.

Example:
    >>> import torch
    >>> from mari_fx.registry import Extension, RULES
    >>> from mari_fx.analysis.rules import rowwise
    >>> def my_op(x): return x * 2
    >>> ext = Extension("mine")
    >>> _ = ext.rule(my_op)(rowwise)
    >>> RULES.first(my_op) is None              # not active
    True
    >>> with use_extensions([ext]):
    ...     RULES.first(my_op) is rowwise
    True
"""
from __future__ import annotations

import contextlib
import functools
import contextvars
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .errors import RegistrationError
from .meta import EXTENSIONS_KEY

_SEQ = itertools.count()
_BY_NAME: Dict[str, "Extension"] = {}


@dataclass(frozen=True)
class Entry:
    """One table entry: ``value`` registered for ``key`` at ``priority`` (``seq``: order of registration)."""

    key: Any
    value: Any
    priority: int
    seq: int


def _describe(key: Any) -> str:
    if isinstance(key, str):
        return repr(key)
    mod = getattr(key, "__module__", "") or ""
    return f"{mod}.{getattr(key, '__qualname__', getattr(key, '__name__', repr(key)))}".lstrip(".")


def _redefines_forward(cls: type) -> bool:
    return "forward" in vars(cls)


class Registry:
    """A named table of extension entries (see the module docstring for the policy).

    Example:
        >>> t = Registry("demo")
        >>> t.add("f", "base"); t.add("f", "first", priority=10)
        >>> t.values("f")
        ['first', 'base']
        >>> t.add("f", "again")
        Traceback (most recent call last):
        ...
        mari_fx.errors.RegistrationError: demo: an entry for 'f' is already registered at priority 0 (override=True replaces it, another priority adds one in front or behind)
    """

    def __init__(self, name: str, doc: str = ""):
        self.name, self.doc = name, doc
        self._entries: Dict[Any, List[Entry]] = {}

    # ------------------------------------------------------------------ writing
    def add(self, key: Any, value: Any, *, priority: int = 0, override: bool = False) -> None:
        """Add ``value`` for ``key``; a second entry at the same priority needs ``override=True``."""
        entries = self._entries.setdefault(key, [])
        same = [e for e in entries if e.priority == priority]
        if same and not override:
            raise RegistrationError(
                f"{self.name}: an entry for {_describe(key)} is already registered at priority {priority} "
                "(override=True replaces it, another priority adds one in front or behind)")
        entries[:] = [e for e in entries if e.priority != priority] + [Entry(key, value, priority, next(_SEQ))]

    def remove(self, key: Any) -> None:
        """Drop every entry of ``key`` in this table."""
        self._entries.pop(key, None)

    # ------------------------------------------------------------------ reading
    def _tables(self) -> List["Registry"]:
        """This table's entries as seen now: the active extensions' tables first, then the core's."""
        return [ext.table(self.name) for ext in active_extensions() if self.name in ext._tables] + [self]

    def entries(self, key: Any) -> List[Entry]:
        """The entries for ``key`` in lookup order (classes: along the MRO, see the module docstring)."""
        keys: Sequence[Any] = _mro_keys(key, self._has) if isinstance(key, type) else [key]
        out: List[Entry] = []
        for k in keys:
            found = [(i, e) for i, t in enumerate(self._tables()) for e in t._entries.get(k, ())]
            found.sort(key=lambda ie: (-ie[1].priority, ie[0], -ie[1].seq))
            out += [e for _, e in found]
        return out

    def _has(self, key: Any) -> bool:
        return any(key in t._entries for t in self._tables())

    def values(self, key: Any) -> List[Any]:
        """The values for ``key`` in lookup order."""
        return [e.value for e in self.entries(key)]

    def first(self, key: Any) -> Any:
        """The first value for ``key``, or None."""
        found = self.entries(key)
        return found[0].value if found else None

    def all(self) -> List[Entry]:
        """Every entry (keys in any order), highest priority first."""
        found = [(i, e) for i, t in enumerate(self._tables()) for es in t._entries.values() for e in es]
        found.sort(key=lambda ie: (-ie[1].priority, ie[0], -ie[1].seq))
        return [e for _, e in found]

    def keys(self) -> List[Any]:
        """Every key with an entry."""
        return list(dict.fromkeys(e.key for e in self.all()))

    def matching(self, value: Any) -> List[Any]:
        """Predicate tables: the values whose key (a predicate) holds for ``value``, in lookup order."""
        return [e.value for e in self.all() if e.key(value)]

    # ------------------------------------------------------------------ mapping-style access (read: core + active)
    def __contains__(self, key: Any) -> bool:
        return self._has(key)

    def __getitem__(self, key: Any) -> Any:
        """The core table's priority-0 entry of ``key`` if it has one, else its first value."""
        if key not in self:
            raise KeyError(key)
        own = [e for e in self._entries.get(key, ()) if e.priority == 0]
        return own[0].value if own else self.first(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        """``table[key] = value``: the core table's priority-0 entry, replaced (``add(..., override=True)``)."""
        self.add(key, value, override=True)

    def __delitem__(self, key: Any) -> None:
        if key not in self._entries:
            raise KeyError(key)
        self.remove(key)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {len(self)} keys)"


def _mro_keys(cls: type, has: Callable[[Any], bool]) -> List[type]:
    """``cls``'s MRO, cut after the first unregistered class (below a registered one) that defines ``forward``."""
    keys: List[type] = []
    for klass in cls.__mro__:
        keys.append(klass)
        if _redefines_forward(klass) and not has(klass):
            break
    return keys


# ---------------------------------------------------------------------------- the tables
RULES = Registry("rules", "op target -> tag rule (ctx) -> Tag, or None to defer")
LOWERINGS = Registry("lowerings", "op target -> lowering (ctx, node, module) -> Value, or None to defer")
LAZY_BUILDERS = Registry("lazy_builders", "name -> (ctx, node) -> a structured value (Combo, Blocks ...) or None")
ROW_GATHERS = Registry("row_gathers", "predicate(value summary) -> gather(value, user_index)")
ROW_TENSORS = Registry("row_tensors", "predicate(value summary) -> rows(value): a tensor the request check counts")
INPUT_GROUPS = Registry("input_groups", "group -> group(...): forward arguments declared together (e.g. bags)")
INPUT_KINDS = Registry("input_kinds", "predicate(example value) -> InputHandler")
BATCH_TYPES = Registry("batch_types", "predicate(value) -> BatchOps")
REQUEST_KINDS = Registry("request_kinds", "InputSpec.kind -> RequestKind")
SUMMARIES = Registry("summaries", "predicate(value) -> summary(value)")
LEAF_MODULES = Registry("leaf_modules", "module class -> share (bool): traced as one call; shared by copies")
PROBE_TYPES = Registry("probe_types", "predicate(value) -> fresh(value, rows, generator) (mari_fx.report.audit)")
CAPTURE_HOOKS = Registry("capture_hooks", "hook -> hook(model): the module to capture instead, or None")
DYNAMIC_KINDS = Registry("dynamic_kinds", "InputSpec.kind -> shapes(spec, rows, example): its dynamic_shapes entry")
CATALOG_KINDS = Registry("catalog_kinds", "InputSpec.kind -> CatalogKind: a catalog input of precompute_items (deploy/precompute.py)")
# Functions transformed graphs call, kept as calls when a pickled module is traced again: global
# (unpickling runs outside any extension scope), filled by mari_fx.runtime.graph_function.
GRAPH_FUNCTIONS = Registry("graph_functions", "fn -> fn")
TABLES = (RULES, LOWERINGS, LAZY_BUILDERS, ROW_GATHERS, ROW_TENSORS, INPUT_GROUPS, INPUT_KINDS, BATCH_TYPES, REQUEST_KINDS, SUMMARIES,
          LEAF_MODULES, PROBE_TYPES, CAPTURE_HOOKS, DYNAMIC_KINDS, CATALOG_KINDS, GRAPH_FUNCTIONS)


# ---------------------------------------------------------------------------- extensions
class Extension:
    """A named bundle of entries for the tables above; active when passed to
    ``mari_fx.transform(..., extensions=[ext])`` or :func:`install`-ed.

    Example:
        >>> import torch, torch.nn as nn, mari_fx
        >>> from mari_fx.analysis.rules import rowwise
        >>> class Scale(nn.Module):                      # a custom leaf, row-wise
        ...     def forward(self, x): return x * 3
        >>> ext = Extension("scale")
        >>> ext.leaf_module(Scale)
        >>> _ = ext.rule(Scale)(rowwise)
        >>> class M(nn.Module):
        ...     def __init__(self): super().__init__(); self.s = Scale(); self.l = nn.Linear(6, 1)
        ...     def forward(self, u, i): return self.l(torch.cat([self.s(u), i], 1))
        >>> T = mari_fx.transform(M().eval(), ["u"], (torch.randn(4, 3), torch.randn(4, 3)), extensions=[ext])
        >>> T.meta["mari_fx.record"].hoisted
        ('s',)
    """

    def __init__(self, name: str):
        self.name = name
        self._tables: Dict[str, Registry] = {}
        _BY_NAME[name] = self

    # T keeps its extensions in T.meta: copies share them, pickles refer to them by name
    def __copy__(self) -> "Extension":
        return self

    def __deepcopy__(self, memo: Any) -> "Extension":
        return self

    def __reduce__(self) -> Any:
        return (_extension_named, (self.name,))

    def table(self, name: str) -> Registry:
        """This extension's own part of the table called ``name``."""
        if name not in self._tables:
            self._tables[name] = Registry(f"{self.name}.{name}")
        return self._tables[name]

    def add(self, table: Registry, key: Any, value: Any, *, priority: int = 0, override: bool = False) -> None:
        """Add an entry to ``table`` (one of :data:`TABLES`) on behalf of this extension."""
        self.table(table.name).add(key, value, priority=priority, override=override)

    # one helper per table: the same signatures as the core's register_* functions
    def rule(self, *targets: Any, priority: int = 0, override: bool = False) -> Callable:
        """Decorator: ``rule(ctx) -> Tag`` (or None to defer) for each target."""
        return self._decorator(RULES, targets, priority, override)

    def lowering(self, *targets: Any, priority: int = 0, override: bool = False) -> Callable:
        """Decorator: ``lowering(ctx: LoweringContext, node, module) -> Value`` (or None to defer)."""
        return self._decorator(LOWERINGS, targets, priority, override)

    def leaf_module(self, cls: type, share: bool = False) -> None:
        """Trace ``cls`` as one call; ``share``: copies of a model share (not copy) its instances."""
        self.add(LEAF_MODULES, cls, share, override=True)

    def row_gather(self, predicate: Callable, gather: Callable, rows: Optional[Callable] = None,
                   priority: int = 0) -> None:
        self.add(ROW_GATHERS, predicate, gather, priority=priority)
        if rows is not None:
            self.add(ROW_TENSORS, predicate, rows, priority=priority)

    def input_group(self, group: Callable, priority: int = 0) -> None:
        self.add(INPUT_GROUPS, group, group, priority=priority)

    def input_kind(self, predicate: Callable, handler: Any, priority: int = 0) -> None:
        self.add(INPUT_KINDS, predicate, handler, priority=priority)

    def batch_type(self, predicate: Callable, ops: Any, priority: int = 0) -> None:
        self.add(BATCH_TYPES, predicate, ops, priority=priority)

    def request_kind(self, kind: str, request_kind: Any) -> None:
        self.add(REQUEST_KINDS, kind, request_kind)

    def summary(self, predicate: Callable, summary: Callable, priority: int = 0) -> None:
        self.add(SUMMARIES, predicate, summary, priority=priority)

    def probe_type(self, predicate: Callable, fresh: Callable, priority: int = 0) -> None:
        self.add(PROBE_TYPES, predicate, fresh, priority=priority)

    def capture_hook(self, hook: Callable, priority: int = 0) -> None:
        self.add(CAPTURE_HOOKS, hook, hook, priority=priority)

    def dynamic_kind(self, kind: str, shapes: Callable) -> None:
        self.add(DYNAMIC_KINDS, kind, shapes)

    def _decorator(self, table: Registry, targets: Sequence[Any], priority: int, override: bool) -> Callable:
        def deco(fn: Callable) -> Callable:
            for t in targets:
                self.add(table, t, fn, priority=priority, override=override)
            return fn
        return deco

    def __repr__(self) -> str:
        return f"Extension({self.name!r})"


def _extension_named(name: str) -> Extension:
    if name not in _BY_NAME:
        raise RegistrationError(f"extension {name!r} is not defined in this process: import the package "
                                "that defines it before loading a module transformed with it")
    return _BY_NAME[name]


_INSTALLED: List[Extension] = []
_SCOPED: contextvars.ContextVar[Tuple[Extension, ...]] = contextvars.ContextVar("mari_fx_extensions", default=())


def install(ext: Extension) -> Extension:
    """Make ``ext`` active everywhere (idempotent); what ``import torchrec_integration`` does."""
    if ext not in _INSTALLED:
        _INSTALLED.append(ext)
    return ext


def uninstall(ext: Extension) -> None:
    """Undo :func:`install`."""
    if ext in _INSTALLED:
        _INSTALLED.remove(ext)


def active_extensions() -> Tuple[Extension, ...]:
    """The extensions in effect now: those of the innermost :func:`use_extensions`, then the installed ones."""
    scoped = _SCOPED.get()
    return tuple(dict.fromkeys(scoped + tuple(reversed(_INSTALLED))))


@contextlib.contextmanager
def use_extensions(extensions: Optional[Iterable[Extension]]) -> Iterator[None]:
    """Make ``extensions`` active inside the ``with`` block (on top of any already active)."""
    extensions = tuple(extensions or ())
    for ext in extensions:
        if not isinstance(ext, Extension):
            raise RegistrationError(f"extensions=[...] takes mari_fx.registry.Extension objects, got {ext!r}")
    token = _SCOPED.set(extensions + _SCOPED.get())
    try:
        yield
    finally:
        _SCOPED.reset(token)


def extensions_of(gm: Any) -> Tuple[Extension, ...]:
    """The extensions ``gm`` was traced or transformed with (empty for anything else)."""
    meta = getattr(gm, "meta", None)
    return tuple(meta.get(EXTENSIONS_KEY, ()) or ()) if isinstance(meta, dict) else ()


def with_extensions_of_arguments(fn: Callable) -> Callable:
    """Decorator: run ``fn`` with the extensions of its GraphModule arguments active (so a
    module transformed with ``extensions=[...]`` is served by the same tables later)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        found = [e for a in (*args, *kwargs.values()) for e in extensions_of(a)]
        with use_extensions(found):
            return fn(*args, **kwargs)

    return wrapper
