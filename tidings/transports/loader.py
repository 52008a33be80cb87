"""Find a driver class by URL scheme through stevedore (entry-point namespace tidings.drivers).

The core imports no driver: ours and third parties' are found the same way, so a plug-in needs
only an entry point in its own distribution, and a missing broker library costs nothing until
its driver is asked for.
"""

from __future__ import annotations

import difflib
import re
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from stevedore.driver import DriverManager

from tidings.transports.base import Driver
from tidings.transports.errors import DriverLoadFailure

__all__ = ["BUILTIN_EXTRAS", "DRIVER_NAMESPACE", "PACKAGE_OF_MODULE", "available_drivers",
           "did_you_mean", "entry_point_names", "install_hint", "load_driver_class",
           "load_plugin"]

DRIVER_NAMESPACE = "tidings.drivers"

BUILTIN_EXTRAS: dict[str, dict[str, str]] = {
    DRIVER_NAMESPACE: {"rabbit": "rabbit", "amqp": "amqp1", "zmq": "zmq"},
    "tidings.matchmakers": {"redis": "redis"},
}
"""namespace -> plug-in name -> the extra of tidings that installs its library, for the
plug-ins tidings itself ships (``pip install 'tidings[EXTRA]'``)."""

PACKAGE_OF_MODULE = {"proton": "python-qpid-proton", "zmq": "pyzmq"}
"""Python modules whose distribution on PyPI has another name."""

T = TypeVar("T")


def entry_point_names(namespace: str) -> list[str]:
    """Names with an installed entry point in ``namespace``, read from the installed
    distributions' metadata without importing any of them.

    (stevedore's ExtensionManager would import every plug-in to list them: asking for
    ``memory://`` then cost the imports of kombu, proton, pyzmq and redis.)
    """
    return sorted({ep.name for ep in entry_points(group=namespace)})


def did_you_mean(name: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``name`` (a typo such as ``rabit``), or None."""
    close = difflib.get_close_matches(name.lower(), candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_hint(namespace: str, name: str, ep: EntryPoint | None = None,
                 missing: str | None = None) -> str:
    """The pip command that lets plug-in ``name`` of ``namespace`` import, whose import failed
    for want of the Python module ``missing``: the extra of tidings for its own plug-ins, the
    plug-in distribution's own requirement (or extra) of that name for the others."""
    dist = getattr(ep, "dist", None) if ep is not None else None
    dist_name = getattr(dist, "name", None) or "tidings"
    extra = BUILTIN_EXTRAS.get(namespace, {}).get(name)
    if dist_name == "tidings" and extra:
        return f"pip install 'tidings[{extra}]'"
    if missing and dist is not None:
        for line in dist.requires or []:
            req, _, marker = line.partition(";")
            req_name = re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0]
            if _norm(req_name) != _norm(missing):
                continue
            found = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", marker)
            if found:
                return f"pip install '{dist_name}[{found.group(1)}]'"
            return f"pip install '{req.strip()}'"
    return f"pip install --force-reinstall '{dist_name}' (the distribution that provides it)"


def _missing_module(exc: BaseException | None, own: str) -> str | None:
    """The top-level module an import failed to find (``'amqp'``), if that is why it failed
    and the module is not the plug-in's own package ``own``."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            top = exc.name.split(".")[0]
            return None if top == own else top
        exc = exc.__cause__ or exc.__context__
    return None


def load_plugin(namespace: str, name: str, base: Any, *, unknown: str,
                unimportable: str, suggest: str = "did you mean {close!r}?") -> type[T]:
    """The class registered as ``name`` in ``namespace``, a subclass of ``base``, or
    DriverLoadFailure saying what to do.

    ``unknown`` and ``unimportable`` are those messages, for ``str.format``: ``unknown`` with
    ``name``, ``installed`` and ``suggestion`` (``suggest`` with the closest installed name,
    e.g. `` did you mean 'rabbit'?``, or empty; an ``unknown`` without ``{suggestion}`` gets it
    at its end); ``unimportable`` (a library the plug-in imports is not installed) with
    ``name``, ``exc``, ``module`` (which module is missing) and ``install`` (the pip command
    that cures it). Any other import failure names the plug-in and the error."""
    eps = {ep.name: ep for ep in entry_points(group=namespace)}
    installed = sorted(eps)
    if name not in eps:
        close = did_you_mean(name, installed)
        suggestion = " " + suggest.format(close=close) if close else ""
        message = unknown.format(name=name, installed=", ".join(installed) or "none",
                                 suggestion=suggestion)
        if suggestion and "{suggestion}" not in unknown:
            message += f" {suggestion[1].upper()}{suggestion[2:]}"
        raise DriverLoadFailure(message)
    ep = eps[name]
    try:
        # imports this one only
        mgr: DriverManager[Any] = DriverManager(namespace, name, invoke_on_load=False)
    except Exception as exc:  # stevedore wraps many failures; say which plug-in failed
        missing = _missing_module(exc, ep.value.split(".")[0].split(":")[0])
        if missing:
            package = PACKAGE_OF_MODULE.get(missing)
            module = f"the Python module {missing!r}" + (f" (package {package})" if package
                                                        else "") + " is not installed"
            raise DriverLoadFailure(unimportable.format(
                name=name, exc=exc, module=module,
                install=install_hint(namespace, name, ep, missing))) from exc
        raise DriverLoadFailure(f"{namespace} entry point {name!r} ({ep.value}) failed to "
                                f"import: {exc}") from exc
    cls = mgr.driver
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise DriverLoadFailure(
            f"entry point {name!r} in {namespace} gives {cls!r}, which is not a subclass of "
            f"{base.__module__}.{base.__qualname__}")
    return cls


def available_drivers() -> list[str]:
    """The schemes with an installed driver entry point (whether or not they import)."""
    return entry_point_names(DRIVER_NAMESPACE)


def load_driver_class(scheme: str) -> type[Driver]:
    """Return the driver class registered for ``scheme`` or raise DriverLoadFailure saying why
    and what to do: for a typo the closest installed scheme, for a driver whose library is
    missing the one extra to install for that scheme."""
    return load_plugin(
        DRIVER_NAMESPACE, scheme, Driver,
        unknown="no tidings driver for scheme {name!r}{suggestion}; installed drivers: "
                "{installed} (for another broker, install the plug-in that provides it)",
        suggest="(did you mean {close}://?)",
        unimportable="the {name}:// driver cannot be loaded because {module}; install it "
                     "with: {install}")
