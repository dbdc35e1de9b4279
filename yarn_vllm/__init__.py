"""yarn-vllm: YaRN context extension served through vLLM.

Importing the package is cheap and has no side effects; vLLM calls
`register()` through the `vllm.general_plugins` entry point.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (see yarn_vllm.vllm_seam.plugin)."""
    from yarn_vllm.vllm_seam.plugin import register as _register

    _register()
