"""Every engine's arguments and environment, built once.

`generate`, `serve`, `eval`, `bench`, sweeps and replicas all start their engines from
`engine_setup`, which adds to the user's vLLM arguments:
- with YaRN settings, our hf_overrides merged with the user's (yarn_vllm.tools.overrides)
  and `max_model_len` = the extended context unless given (a longer one is refused);
- on vLLM's CPU platform, yarn_vllm.tools.cpu's defaults and, for tensor or pipeline
  parallelism, one core group per rank (VLLM_CPU_OMP_THREADS_BIND), so `--tensor-parallel-size
  2` works wherever an engine starts, not only under `serve`.
Offline engines take the result as `LLM(...)` keyword arguments; `serve` renders it as server
flags (yarn_vllm.tools.cli.serve).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from yarn_vllm.errors import UserError
from yarn_vllm.tools.cpu import cpu_engine_setup, on_cpu
from yarn_vllm.yarn.config import YarnConfig

PLUGIN_NAME = "yarn_vllm"  # our name in the vllm.general_plugins entry-point group


@dataclass
class EngineSetup:
    kwargs: dict                              # the user's engine arguments with ours merged
    env: dict = field(default_factory=dict)   # defaults: set only where the variable is unset

    def apply_env(self, target: dict | None = None) -> dict:
        """Our environment defaults into `target` (os.environ by default); returns it."""
        target = os.environ if target is None else target
        for key, value in self.env.items():
            target.setdefault(key, value)
        return target


def engine_setup(user: dict, *, hf_config: dict | None = None, yarn: YarnConfig | None = None,
                 flags: dict | None = None, server: bool = False,
                 cores: list[int] | None = None, cpu: bool | None = None,
                 env: dict | None = None, source: str = "engine") -> EngineSetup:
    """The engine arguments and environment for `user`'s vLLM arguments (snake_case).

    `yarn` (with the model's `hf_config`): serve it, merged with the user's hf_overrides;
    `flags`: the YaRN flags given (yarn_vllm.tools.cli.args.yarn_flags_given), whose values
    the user's hf_overrides may not contradict. `server`: for vLLM's API server (it keeps a
    core for itself). `cores`: the cores this engine may use (default: this process's).
    `cpu`: vLLM's platform is the CPU (default: ask the installed vLLM). `env`: the
    environment the engine will see (default os.environ); a variable set there wins.
    Raises UserError, naming the argument, before any engine starts.
    """
    kwargs = dict(user)
    if yarn is not None:
        from yarn_vllm.tools.overrides import yarn_hf_overrides

        overrides = yarn_hf_overrides(hf_config, yarn, kwargs.pop("hf_overrides", None), flags)
        extended = overrides["max_position_embeddings"]
        max_len = kwargs.get("max_model_len")
        if max_len is not None and int(max_len) > extended:
            raise UserError(
                "max_model_len", f"is {max_len}, past the extended context of {extended} tokens",
                f"lower --max-model-len, or raise --factor / --target-context to cover {max_len}")
        kwargs["hf_overrides"] = overrides
        kwargs.setdefault("max_model_len", extended)
    setup = EngineSetup(kwargs)
    if on_cpu(env) if cpu is None else cpu:
        extra, setup.env = cpu_engine_setup(kwargs, server=server, cores=cores, env=env,
                                            source=source)
        kwargs.update(extra)
    return setup


def check_plugin_installed(env: dict | None = None, source: str = "serve") -> None:
    """Fail early if vLLM would not load our plugin in an engine with environment `env`."""
    from importlib.metadata import entry_points

    env = os.environ if env is None else env
    names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
    if PLUGIN_NAME not in names:
        raise UserError("vllm.general_plugins", f"has no {PLUGIN_NAME} entry point, so vLLM "
                        "would not load the plugin", "pip install -e . (or ./install.sh) in "
                        "this environment", source=source)
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        raise UserError("VLLM_PLUGINS", f"is {allowed!r}, which leaves out {PLUGIN_NAME}, so "
                        "vLLM's own layers would serve",
                        f"unset VLLM_PLUGINS or add {PLUGIN_NAME}", source="environment")
