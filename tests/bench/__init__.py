"""Tests of yarn-vllm bench, sweeps and replicas (a package, so that its conftest does not
shadow tests/conftest.py under the module name `conftest`)."""
