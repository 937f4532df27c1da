"""Run pytest-style unit test modules on a bare Python (3.9+) that has no pytest: stdlib only.

Strategy: the point is to run hmacfs's own unit tests under the interpreters the zipapp
promises (Debian 11's 3.9, Debian 13's 3.13) in roots holding only `python3`, so nothing may
be installed there. Instead of pytest, a small stand-in `pytest` module offers what these
tests use (`raises`, `mark.parametrize`/`skipif`, `param`, `skip`, `fail`, `approx`) and the
runner supplies the two built-in fixtures they need (`tmp_path`, `monkeypatch`). Hypothesis
is not there either: `@given` tests are reported as skipped, never as passed. A test that
asks for any other fixture is skipped with that reason. Honest counts are the output: one
JSON line with passed / failed (with tracebacks) / skipped (with reasons) per module.

    python3 -m tests.support.stdlib_runner tests.unit.test_auth tests.unit.test_units ...

Each module runs in its own interpreter, a few at a time.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import inspect
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

BUILTIN_FIXTURES = ("tmp_path", "monkeypatch")
# What tests import that a bare interpreter lacks (Python 3.9 has no sys.stdlib_module_names to tell).
TEST_ONLY_PACKAGES = frozenset({"boto3", "botocore", "moto", "redis", "slixmpp", "aiohttp", "tusclient", "atheris"})
JOBS = 4  # modules at once: most of their time is spent waiting (timeouts, sleeps), not computing


class Skipped(Exception):
    """pytest.skip() inside a test."""


class Failed(AssertionError):
    """pytest.fail() inside a test."""


class _Param:
    def __init__(self, *values: Any, id: Optional[str] = None, marks: Any = ()) -> None:
        self.values, self.id, self.marks = values, id, marks


class _Mark:
    """`pytest.mark.X(...)`: parametrize and skipif are recorded on the function; others are no-ops."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.name not in ("parametrize", "skipif", "skip") and len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # a bare marker such as @pytest.mark.slow

        def apply(fn: Callable) -> Callable:
            fn.__dict__.setdefault("_marks", []).append((self.name, args, kwargs))
            return fn
        return apply


class _MarkFactory:
    def __getattr__(self, name: str) -> _Mark:
        return _Mark(name)


@contextlib.contextmanager
def _raises(expected: Any, match: Optional[str] = None) -> Iterator[types.SimpleNamespace]:
    info = types.SimpleNamespace(value=None, type=None)
    try:
        yield info
    except expected as e:
        info.value, info.type = e, type(e)
        if match is not None and not re.search(match, str(e)):
            raise AssertionError(f"{e!r} does not match {match!r}") from e
        return
    raise AssertionError(f"DID NOT RAISE {expected}")


class _Approx:
    def __init__(self, expected: float, rel: Optional[float] = None, abs: Optional[float] = None) -> None:
        self.expected, self.rel, self.abs = expected, rel, abs

    def __eq__(self, other: object) -> bool:
        rel = 1e-6 if self.rel is None else self.rel
        tol = max(rel * abs(self.expected), 1e-12 if self.abs is None else self.abs)
        return isinstance(other, (int, float)) and math.isclose(other, self.expected, abs_tol=tol)


def _skip(reason: str = "", **_: Any) -> None:
    raise Skipped(reason)


def _fail(reason: str = "", **_: Any) -> None:
    raise Failed(reason)


def _fixture(*args: Any, **kwargs: Any) -> Any:
    def mark(fn: Callable) -> Callable:
        fn._fixture = list(kwargs.get("params") or [None])  # type: ignore[attr-defined]
        return fn
    return mark(args[0]) if len(args) == 1 and callable(args[0]) and not kwargs else mark


class _Anything:
    """A stand-in for Hypothesis strategies at module level: every use gives another stand-in."""

    def __getattr__(self, name: str) -> _Anything:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not isinstance(args[0], _Anything) and not kwargs:
            if args[0].__name__.startswith("test_"):
                return args[0]  # a decorator on a test: @settings(...), @example(...)
            return lambda *a, **k: self  # @st.composite: calling the strategy gives a stand-in
        return self

    def __or__(self, other: Any) -> _Anything:
        return self

    __ror__ = __or__

    def __iter__(self) -> Iterator[Any]:
        return iter(())


def _given(*args: Any, **kwargs: Any) -> Callable:
    def mark(fn: Callable) -> Callable:
        def skipped() -> None:
            raise Skipped("a Hypothesis property (Hypothesis is not on a bare host)")
        skipped.__name__ = fn.__name__
        return skipped
    return mark


def _importorskip(name: str, *args: Any, **kwargs: Any) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise Skipped(f"needs the package {name}") from None


def install_shims() -> None:
    """Put the stand-in `pytest` and `hypothesis` modules where the test modules will import them."""
    pytest = types.ModuleType("pytest")
    pytest.raises = _raises  # type: ignore[attr-defined]
    pytest.mark = _MarkFactory()  # type: ignore[attr-defined]
    pytest.param = _Param  # type: ignore[attr-defined]
    pytest.skip = _skip  # type: ignore[attr-defined]
    pytest.fail = _fail  # type: ignore[attr-defined]
    pytest.approx = _Approx  # type: ignore[attr-defined]
    pytest.fixture = _fixture  # type: ignore[attr-defined]
    pytest.importorskip = _importorskip  # type: ignore[attr-defined]
    sys.modules["pytest"] = pytest
    anything = _Anything()
    hyp = types.ModuleType("hypothesis")
    hyp.given = _given  # type: ignore[attr-defined]
    for name in ("settings", "example", "assume", "HealthCheck", "note", "event", "target", "Verbosity", "Phase"):
        setattr(hyp, name, anything)
    strategies = types.ModuleType("hypothesis.strategies")
    strategies.__getattr__ = lambda name: anything  # type: ignore[attr-defined]
    hyp.strategies = strategies  # type: ignore[attr-defined]
    sys.modules["hypothesis"] = hyp
    sys.modules["hypothesis.strategies"] = strategies
    try:  # the test helpers read TOML with tomli before 3.11: give them the copy the zipapp carries
        import tomli  # noqa: F401
    except ImportError:
        try:
            from hmacfs._vendor import tomli as vendored
            sys.modules["tomli"] = vendored
        except ImportError:
            pass


class MonkeyPatch:
    """The parts of pytest's monkeypatch these tests use, undone after each test."""

    _missing = object()

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setattr(self, target: Any, name: Any, value: Any = _missing, raising: bool = True) -> None:
        if value is self._missing:  # setattr("module.attr", value)
            module, _, attr = str(target).rpartition(".")
            target, name, value = importlib.import_module(module), attr, name
        old = getattr(target, name, self._missing)
        setattr(target, name, value)
        self._undo.append(lambda: delattr(target, name) if old is self._missing else setattr(target, name, old))

    def delattr(self, target: Any, name: str, raising: bool = True) -> None:
        if not hasattr(target, name):
            if raising:
                raise AttributeError(name)
            return
        old = getattr(target, name)
        delattr(target, name)
        self._undo.append(lambda: setattr(target, name, old))

    def setenv(self, name: str, value: str, prepend: Optional[str] = None) -> None:
        old = os.environ.get(name)
        os.environ[name] = value
        self._undo.append(lambda: os.environ.pop(name, None) if old is None else os.environ.__setitem__(name, old))

    def delenv(self, name: str, raising: bool = True) -> None:
        if name in os.environ:
            old = os.environ.pop(name)
            self._undo.append(lambda: os.environ.__setitem__(name, old))
        elif raising:
            raise KeyError(name)

    def setitem(self, mapping: Any, key: Any, value: Any) -> None:
        old = mapping.get(key, self._missing)
        mapping[key] = value
        self._undo.append(lambda: mapping.pop(key, None) if old is self._missing else mapping.__setitem__(key, old))

    def chdir(self, path: Any) -> None:
        old = os.getcwd()
        os.chdir(path)
        self._undo.append(lambda: os.chdir(old))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _cases(fn: Callable) -> Iterator[tuple[str, dict[str, Any], Optional[str]]]:
    """(id, arguments, skip reason) for each parametrized case of fn (the cross product of its marks)."""
    skip = None
    axes: list[list[tuple[str, dict[str, Any]]]] = []
    for name, args, kwargs in reversed(fn.__dict__.get("_marks", [])):
        if name == "skipif" and args and args[0]:
            skip = kwargs.get("reason", "skipif")
        elif name == "skip":
            skip = kwargs.get("reason", args[0] if args else "skip")
        elif name == "parametrize":
            names = [n.strip() for n in args[0].split(",")] if isinstance(args[0], str) else list(args[0])
            axis = []
            for i, value in enumerate(args[1]):
                values = value.values if isinstance(value, _Param) else (value if len(names) > 1 else (value,))
                axis.append((str(i), dict(zip(names, values))))
            axes.append(axis)
    for combo in itertools.product(*axes):
        merged: dict[str, Any] = {}
        for _, kwargs in combo:
            merged.update(kwargs)
        yield "-".join(i for i, _ in combo), merged, skip


def _fixture_closure(fn: Callable, given: dict[str, Any], defined: dict[str, Callable]) -> tuple[list[str], list[str]]:
    """The module fixtures fn needs, dependencies first, and the names nobody here provides."""
    order: list[str] = []
    unknown: list[str] = []

    def visit(f: Callable, skip: Any) -> None:
        for p in inspect.signature(f).parameters:
            if p in skip or p in order or p in BUILTIN_FIXTURES or p == "request":
                continue
            if p in defined:
                visit(defined[p], ())
                order.append(p)
            elif p not in unknown:
                unknown.append(p)
    visit(fn, given)
    return order, unknown


def _run_case(fn: Callable, args: dict[str, Any], order: list[str], defined: dict[str, Callable],
              params: dict[str, Any]) -> None:
    """Set up the fixtures (module ones as function-scoped), call the test, tear down in reverse."""
    tmp = Path(tempfile.mkdtemp(prefix="hmacfs-unit-"))
    mp = MonkeyPatch()
    values: dict[str, Any] = {"tmp_path": tmp, "monkeypatch": mp}
    teardown: list[Iterator[Any]] = []
    try:
        for name in order:
            f = defined[name]
            request = types.SimpleNamespace(param=params.get(name))
            kwargs = {p: request if p == "request" else values[p] for p in inspect.signature(f).parameters}
            value = f(**kwargs)
            if inspect.isgenerator(value):
                teardown.append(value)
                value = next(value)
            values[name] = value
        fn(**args, **{p: values[p] for p in inspect.signature(fn).parameters if p not in args})
    finally:
        for gen in reversed(teardown):
            with contextlib.suppress(StopIteration):
                next(gen)
        mp.undo()
        shutil.rmtree(tmp, ignore_errors=True)


def run_module(name: str) -> dict[str, Any]:
    """Import one test module and run its test functions; a module that cannot import is one skip.
    Fixtures defined in the module are supported (function-scoped, `params` as extra cases); those
    from conftest.py or pytest's own beyond tmp_path/monkeypatch are not: such tests are skipped."""
    result: dict[str, Any] = {"passed": 0, "failed": [], "skipped": []}
    try:
        module = importlib.import_module(name)
    except Exception as e:
        result["skipped"].append(f"<import>: {type(e).__name__}: {e}")
        return result
    defined = {n: f for n, f in vars(module).items() if inspect.isfunction(f) and hasattr(f, "_fixture")}
    for attr, fn in sorted(vars(module).items()):
        if not attr.startswith("test_") or not inspect.isfunction(fn) or hasattr(fn, "_fixture"):
            continue
        for case_id, args, skip in _cases(fn):
            label = f"{attr}[{case_id}]" if case_id else attr
            if skip:
                result["skipped"].append(f"{label}: {skip}")
                continue
            order, unknown = _fixture_closure(fn, args, defined)
            if unknown:
                result["skipped"].append(f"{label}: needs pytest fixture(s) {', '.join(unknown)}")
                continue
            axes = [[(n, i, v) for i, v in enumerate(defined[n]._fixture)] for n in order]  # type: ignore[attr-defined]
            for combo in itertools.product(*axes):
                params = {n: v for n, _, v in combo}
                extra = "-".join(f"{n}{i}" for n, i, _ in combo if len(defined[n]._fixture) > 1)  # type: ignore[attr-defined]
                case = f"{label}[{extra}]" if extra else label
                try:
                    _run_case(fn, args, order, defined, params)
                    result["passed"] += 1
                except Skipped as e:
                    result["skipped"].append(f"{case}: {e}")
                except ModuleNotFoundError as e:
                    if not _test_only_package(e.name):
                        result["failed"].append(f"{case}:\n{traceback.format_exc(limit=-6)}")
                    else:  # a reference implementation to compare with (botocore, redis-py): not here
                        result["skipped"].append(f"{case}: needs the package {e.name}")
                except BaseException:
                    result["failed"].append(f"{case}:\n{traceback.format_exc(limit=-6)}")
    return result


def _test_only_package(name: Optional[str]) -> bool:
    """A package tests import that is not hmacfs's nor the standard library's (requirements-test.txt)."""
    top = (name or "").partition(".")[0]
    if not top or top == "hmacfs":
        return False
    stdlib = getattr(sys, "stdlib_module_names", None)  # 3.10+
    return top not in stdlib if stdlib is not None else top in TEST_ONLY_PACKAGES


def _run_isolated(name: str) -> dict[str, Any]:
    """One module in its own interpreter: a module's leftovers (logging handlers, patched globals,
    threads) cannot touch another, and modules that mostly sleep overlap."""
    r = subprocess.run([sys.executable, "-m", __spec__.name if __spec__ else "stdlib_runner", "--single", name],
                       capture_output=True, text=True, timeout=600)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])["modules"][name]
    except (IndexError, KeyError, ValueError):
        return {"passed": 0, "failed": [f"<runner>: exit {r.returncode}\n{r.stderr[-3000:]}"], "skipped": []}


def main(argv: list[str]) -> int:
    single = argv[:1] == ["--single"]
    names = argv[1:] if single else argv
    install_shims()
    if single:
        modules = {n: run_module(n) for n in names}
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=JOBS) as pool:
            modules = dict(zip(names, pool.map(_run_isolated, names)))
    report = {"python": ".".join(map(str, sys.version_info[:3])), "modules": modules}
    print(json.dumps(report))
    return 1 if any(m["failed"] for m in modules.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
