"""``python -m jaxspec.bench [run] [flags]``, ``... predict [flags]`` or ``... stub [flags]``."""

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        from jaxspec.bench.predict import main as predict

        predict(argv[1:])
        return
    if argv[:1] == ["stub"]:
        from jaxspec.bench.stub import main as stub

        stub(argv[1:])
        return
    from jaxspec.bench.cli import main as run
    from jaxspec.bench.cli import stop_on_sigterm

    stop_on_sigterm()
    summary = run(argv[1:] if argv[:1] == ["run"] else argv)
    if summary["config_errors"]:  # the reports are written; the exit status says something is missing
        sys.exit(1)


if __name__ == "__main__":
    main()
