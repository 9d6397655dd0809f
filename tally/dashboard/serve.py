"""The dashboard server process: ``python -m tally.dashboard.serve run APP [streamlit options]``.

Why not ``python -m streamlit``: Streamlit imports pandas and pyarrow lazily inside the first script
run, so the first visitor of a fresh server waits for them (bench/dashboard_load.py: most of a cold
first page load on 2 busy cores). This entry point imports what the first page needs, then hands the
arguments to Streamlit's own command line, exactly as ``python -m streamlit`` does. ``launch`` starts
it; only the server process imports it.
"""

from __future__ import annotations

import importlib

# Never modules that define st.cache_* functions: imported before the runtime exists, their caches
# would not be the server's.
FIRST_PAGE_MODULES = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "yaml", "streamlit.dataframe_util",
                      "tally.dashboard.data")


def main() -> None:
    for name in FIRST_PAGE_MODULES:
        importlib.import_module(name)
    from streamlit import delta_generator
    from streamlit.web import cli

    # Streamlit's first element of a process checks whether it runs in a REPL (to warn about a bare
    # `python app.py`) with inspect.stack(), which reads the source of every frame: 0.1-0.2 s of the
    # first visitor's wait. This is `streamlit run`, so the warning can never apply: mark it shown.
    delta_generator._use_warning_has_been_displayed = True
    cli.main(prog_name="streamlit")


if __name__ == "__main__":
    main()
