"""Unlearning methods: a registry written out literally, plus user plugins.

`--method NAME` picks a built-in method; `--method pkg.module:fn` or `--method path/to/file.py:fn`
loads a plugin function with the signature documented in `api.py`. A plugin's hyperparameters are
`method.<fn>.*` in the config and reach it as a plain dict.

Two groups (`Method.group`, listed apart by `unlearn methods`): baselines and classic methods
from the literature, and the seven winning entries of the NeurIPS 2023 challenge. Defaults of the
built-in methods come from each paper, its authors' code or the team's notebook for CIFAR-10
ResNet-18; each file cites its source and marks what digits needed changed. The values that do
not carry over from a ResNet to the digits MLP (mostly learning rates, which depend on the model
and the optimizer) were calibrated once on the digits default by one rule: from a small grid, the
value whose runs leave the forget examples as confident, on average, as the retrained models
(mean logit-scaled confidence 5.5; the original model: 5.8), among values that keep the mean
test accuracy within 1 point of the original's. Measured with 20 runs against 20 reference
models; the rule looks at confidences and accuracies, never at the score F. The challenge
entries were calibrated with `benchmarks/calibrate_methods.py`; each of their files records the
grid it was chosen from.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..config import Config, build_dataclass
from ..errors import ConfigError, MethodError

__all__ = ["GROUPS", "REGISTRY", "Method", "UnlearnData", "resolve", "method_params"]


def __getattr__(name: str) -> Any:
    # `from unlearn_cli.methods import UnlearnData` keeps working without importing torch (api.py
    # imports it) when only the registry is needed: `unlearn methods`, argument checks.
    if name == "UnlearnData":
        from .api import UnlearnData

        return UnlearnData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _load(ref: str) -> Any:
    """`.module:attr` (relative to this package) or `pkg.module:attr` -> the object."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module, package=__name__), attr)


@dataclasses.dataclass(frozen=True)
class Method:
    """A method: built-in entries name their function and parameters as `.module:attr` strings,
    imported on first use, so that listing the registry never imports torch; plugins hold the
    objects themselves."""

    name: str  # registry name, or the plugin's function name
    fn_ref: Callable[..., Any] | str  # the function, or where it is: ".finetune:unlearn"
    params_ref: type | str | None  # frozen dataclass of hyperparameters (or where it is);
    #                                None for plugins (plain dict)
    summary: str
    spec: str  # what the user typed after --method
    group: str = "baseline"  # GROUPS: how `unlearn methods` lists it

    @property
    def fn(self) -> Callable[..., Any]:
        return _load(self.fn_ref) if isinstance(self.fn_ref, str) else self.fn_ref

    @property
    def params(self) -> type | None:
        return _load(self.params_ref) if isinstance(self.params_ref, str) else self.params_ref


# One entry per method, written out: Method(name, ".<file>:unlearn", ".<file>:Params", summary,
# name). Strings, not imports, so that `unlearn methods` and every argument error answer at once.
REGISTRY: dict[str, Method] = {
    "none": Method("none", ".none:unlearn", ".none:Params",
                   "return the original model unchanged (the floor: scores 0)", "none"),
    "retrain": Method("retrain", ".retrain:unlearn", ".retrain:Params",
                      "train from scratch on retain, as the references were (the oracle)",
                      "retrain"),
    "finetune": Method("finetune", ".finetune:unlearn", ".finetune:Params",
                       "fine-tune the original model on the retain set", "finetune"),
    "reset-head": Method("reset-head", ".reset_head:unlearn", ".reset_head:Params",
                         "re-initialise the classifier head, then fine-tune on retain",
                         "reset-head"),
    "neggrad": Method("neggrad", ".neggrad:unlearn", ".neggrad:Params",
                      "gradient ascent on the forget set's loss (NegGrad)", "neggrad"),
    "neggrad-plus": Method("neggrad-plus", ".neggrad_plus:unlearn", ".neggrad_plus:Params",
                           "descend on retain, ascend on forget (NegGrad+, Kurmanji 2023)",
                           "neggrad-plus"),
    "random-label": Method("random-label", ".random_label:unlearn", ".random_label:Params",
                           "fine-tune on forget with random wrong labels, mixed with retain",
                           "random-label"),
    "scrub": Method("scrub", ".scrub:unlearn", ".scrub:Params",
                    "obey the original on retain, disobey it on forget (SCRUB, 2023)",
                    "scrub"),
    "salun": Method("salun", ".salun:unlearn", ".salun:Params",
                    "random labels on the forget-salient weights only (SalUn, 2024)",
                    "salun"),
    "l1-sparse": Method("l1-sparse", ".l1_sparse:unlearn", ".l1_sparse:Params",
                        "fine-tune on retain with a decaying l1 penalty (Jia 2023)", "l1-sparse"),
    "bad-teacher": Method("bad-teacher", ".bad_teacher:unlearn", ".bad_teacher:Params",
                          "distil the original on retain, a random net on forget (2023)",
                          "bad-teacher"),
    "ssd": Method("ssd", ".ssd:unlearn", ".ssd:Params",
                  "shrink weights that matter far more to forget than to all (SSD)",
                  "ssd"),
    # Entries of the NeurIPS 2023 challenge (arXiv:2406.09073), in the order Deep Unlearn lists
    # them (arXiv:2410.01276).
    "forget-contrastive": Method(
        "forget-contrastive", ".forget_contrastive:unlearn", ".forget_contrastive:Params",
        "forget outputs to uniform, then contrastive rounds",
        "forget-contrastive", "challenge"),
    "masked-small-gradients": Method(
        "masked-small-gradients", ".masked_small_gradients:unlearn",
        ".masked_small_gradients:Params",
        "redraw the smallest-gradient weights, damp the rest",
        "masked-small-gradients", "challenge"),
    "noisy-finetune": Method(
        "noisy-finetune", ".noisy_finetune:unlearn", ".noisy_finetune:Params",
        "noised conv weights, class-balanced fine-tuning",
        "noisy-finetune", "challenge"),
    "prune-reinit": Method(
        "prune-reinit", ".prune_reinit:unlearn", ".prune_reinit:Params",
        "prune 99% of weights, redraw, match entropy, fp16",
        "prune-reinit", "challenge"),
    "conv-transpose": Method(
        "conv-transpose", ".conv_transpose:unlearn", ".conv_transpose:Params",
        "transpose conv kernels, then fine-tune on retain",
        "conv-transpose", "challenge"),
    "reset-distill": Method(
        "reset-distill", ".reset_distill:unlearn", ".reset_distill:Params",
        "reset first layer and head, distil, fine-tune",
        "reset-distill", "challenge"),
    "noisy-subsets": Method(
        "noisy-subsets", ".noisy_subsets:unlearn", ".noisy_subsets:Params",
        "reset head, train noised random layer subsets",
        "noisy-subsets", "challenge"),
}
# `unlearn methods` lists the methods by group, in this order, under these titles.
GROUPS = {"baseline": "baselines and classic methods",
          "challenge": "NeurIPS 2023 challenge entries"}


class Interrupts:
    """Tells a real Ctrl-C from a KeyboardInterrupt that user code raised itself.

    Used around a plugin's import and each method call: `interrupted` is True only if SIGINT
    arrived meanwhile. In a worker process SIGINT is ignored, so any KeyboardInterrupt there is
    the code's own; it is then a failure of that method and seed, not a stop of the whole run.
    """

    def __init__(self) -> None:
        self.interrupted = False
        self._previous: Any = None

    def __enter__(self) -> Interrupts:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):
            return self  # SIGINT cannot arrive: nothing to tell apart

        def note(signum: int, frame: Any) -> None:
            self.interrupted = True
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt

        self._previous = previous
        signal.signal(signal.SIGINT, note)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            import signal

            signal.signal(signal.SIGINT, self._previous)


def user_code_error(exc: BaseException, interrupts: Interrupts) -> str | None:
    """One line for a SystemExit or a KeyboardInterrupt raised by user code; None when the
    exception must go on (a real Ctrl-C, or anything else)."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}) (a method must return the model or raise)"
    if isinstance(exc, KeyboardInterrupt) and not interrupts.interrupted:
        return "raised KeyboardInterrupt itself (no Ctrl-C was pressed)"
    return None


def is_plugin(spec: str) -> bool:
    return ":" in spec


def resolve(spec: str) -> Method:
    """The method named by `--method`: a registry name or a plugin `module:fn` / `file.py:fn`."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    if not is_plugin(spec):
        raise MethodError(
            f"unknown method {spec!r}; valid methods: {', '.join(REGISTRY)} "
            "(or a plugin: --method pkg.module:fn or --method path/to/file.py:fn)"
        )
    where, _, fn_name = spec.rpartition(":")
    if not where or not fn_name.isidentifier():
        raise MethodError(
            f"plugin {spec!r} is not of the form pkg.module:function or path/to/file.py:function"
        )
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _load_file(where, spec)
    else:
        interrupts = Interrupts()
        try:
            with interrupts:
                module = importlib.import_module(where)
        except ImportError as exc:
            raise MethodError(
                f"plugin {spec!r}: cannot import module {where!r} ({exc}); check the name and "
                "that it is importable (installed, or its folder on PYTHONPATH)"
            ) from None
        except BaseException as exc:  # noqa: BLE001 - the user's module, any error
            what = user_code_error(exc, interrupts)
            if what is None and not isinstance(exc, Exception):
                raise
            raise MethodError(f"plugin {spec!r}: importing {where} "
                              f"{what or f'failed: {type(exc).__name__}: {exc}'}") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise MethodError(
            f"plugin {spec!r}: {where} has no function {fn_name!r}; functions there: "
            f"{', '.join(found) or 'none'}"
        )
    summary = (fn.__doc__ or "user plugin").strip().splitlines()[0]
    return Method(fn_name, fn, None, summary, spec)


def _load_file(path_text: str, spec: str) -> Any:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise MethodError(f"plugin {spec!r}: file {path_text} does not exist; give the path to a "
                          ".py file, relative to the current folder or absolute")
    name = f"unlearn_plugin_{abs(hash(str(path)))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    interrupts = Interrupts()
    try:
        with interrupts:
            module_spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - the user's file, any error
        what = user_code_error(exc, interrupts)
        if what is None and not isinstance(exc, Exception):
            raise  # a real Ctrl-C
        raise MethodError(f"plugin {spec!r}: importing {path_text} "
                          f"{what or f'failed: {type(exc).__name__}: {exc}'}") from None
    sys.modules[name] = module
    return module


def check_method_sections(cfg: Config, extra: tuple[str, ...] = ()) -> None:
    """Catch typos in `method.<name>` sections.

    A section may name a built-in method, the plugin in use (`extra`), or another plugin (its
    function's name): plugins are not known until they run, so sections for them are kept. A
    name within a typo of a built-in (`finetun`) is an error, since its settings would otherwise
    be silently ignored.
    """
    import difflib

    for name in cfg.method:
        if name in REGISTRY or name in extra:
            continue
        close = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.8)
        if close:
            raise ConfigError(
                f"method.{name}: unknown method; did you mean method.{close[0]}? (sections under "
                f"method: name a built-in method ({', '.join(REGISTRY)}) or a plugin function)"
            )


def method_params(method: Method, cfg: Config) -> Any:
    """The method's hyperparameters from `method.<name>.*`, validated (all problems at once)."""
    raw: Mapping[str, Any] = cfg.method.get(method.name, {})
    if method.params is None:
        return dict(raw)
    if raw and not dataclasses.fields(method.params):
        raise ConfigError(
            f"method.{method.name}: {method.name} takes no hyperparameters, got "
            f"{', '.join(sorted(raw))}; remove the method.{method.name} section"
        )
    problems: list[str] = []
    params = build_dataclass(method.params, raw, f"method.{method.name}", problems)
    # Checks of a method's own (a `problems(prefix)` method on its Params), then the shared ones.
    check = getattr(params, "problems", None)
    if callable(check):
        problems += check(f"method.{method.name}")
    # Ranges shared by the methods' common hyperparameters, checked here once for all of them.
    for key, low, strict in (("epochs", 1, False), ("batch_size", 1, False), ("lr", 0, True)):
        value = getattr(params, key, None)
        if value is not None and (value <= low if strict else value < low):
            bound = f"> {low}" if strict else f">= {low}"
            problems.append(f"method.{method.name}.{key}: expected {bound}, got {value!r}")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s): " + "; ".join(problems))
    return params
