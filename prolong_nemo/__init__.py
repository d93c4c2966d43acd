"""prolong-nemo: the ProLong long-context recipe for Llama-3 on Megatron-Core / NeMo Framework."""


def __getattr__(name: str) -> str:
    # `__version__` is the installed distribution's (pyproject.toml's), read on first use so that
    # importing the package stays free of importlib.metadata.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("prolong-nemo")
        except PackageNotFoundError:  # a source tree on sys.path that was never installed
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
