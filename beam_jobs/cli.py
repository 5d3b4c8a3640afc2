"""The command-line contract every job shares: flags, errors, exit codes and log noise.

* Flags: each job declares its own flags in `JobOptions._add_argparse_args(parser)`;
  `split_job_flags` parses them with a plain argparse parser and hands the rest to
  `PipelineOptions(rest)`, as Beam's own examples do with `parse_known_args`. A flag that neither
  the job nor Beam/Dataflow defines ends the job with exit 2 and a "did you mean" hint.
* Errors: `run_main(run_fn)` is every job's entry point. A user error (`UsageError`, or a
  ValueError / file error raised before any element is processed) ends with one line
  `error: ...` on stderr and exit 2; Ctrl-C with `interrupted` and exit 130; `--verbose` adds
  the traceback and third-party logging.
* Logs: a local run shows only the project's own log records and CRITICAL ones from third-party
  packages (Beam, google-auth, grpc: their failures reach `run_main` as exceptions anyway).

Third-party packages are imported inside functions: `beam_jobs/__init__.py` imports this module
to quiet the logs before Apache Beam is first imported.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import sys
import traceback
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence

VERBOSE_FLAG = "--verbose"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Errors that mean "the job was called wrongly" when raised before any element is processed.
LAUNCH_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError,
                      NotADirectoryError, PermissionError)
# Modules whose frames mean the exception came out of element processing (a DoFn), not launch.
_ELEMENT_PROCESSING_MODULES = ("apache_beam.runners.worker", "apache_beam.runners.common")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROJECT_PACKAGES = tuple(os.path.join(_PROJECT_ROOT, name) + os.sep
                          for name in ("beam_jobs", "transforms", "dataset"))
_BEAM_EPILOG = ("Any Beam / Dataflow pipeline flag (--runner, --project, --region, --temp_location,\n"
                "--direct_num_workers, --sdk_container_image, --experiments, ...) passes through.")


class UsageError(ValueError):
    """A mistake in how a job was called (a flag, an input path, a missing model): the job ends
    with one line on stderr and exit 2, no traceback (see `run_main`)."""


# ---- flags ---------------------------------------------------------------------------------------

class JobOptions:
    """Base of every job's own options class (RebuildOptions, ScanOptions, VerifyOptions, ...).

    Subclasses override the classmethod `_add_argparse_args(parser)` (the same protocol as Beam's
    PipelineOptions). This is deliberately *not* a PipelineOptions subclass: Beam never sees the
    job's flags, so two jobs that both define --output, or a `required=True` flag, cannot clash in
    Beam's global parser. An instance (built by `split_job_flags`) reads the job's flag values as
    attributes, and `view_as(...)` answers from the pipeline options of the same command line.
    """

    def __init__(self, values: argparse.Namespace, pipeline_options: Any = None) -> None:
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_pipeline_options", pipeline_options)

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add the job's flags to `parser` (override in each job)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never recurse while copying or unpickling
            raise AttributeError(name)
        try:
            return getattr(self._values, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no flag --{name}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._values, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"

    def as_dict(self) -> dict[str, Any]:
        """The job's flag values by name (Beam's flags are not included)."""
        return dict(vars(self._values))

    def view_as(self, cls: type) -> Any:
        """`PipelineOptions.view_as` on the Beam flags of the same command line."""
        if self._pipeline_options is None:
            from apache_beam.options.pipeline_options import PipelineOptions

            object.__setattr__(self, "_pipeline_options", PipelineOptions([]))
        return self._pipeline_options.view_as(cls)


class JobArgumentParser(argparse.ArgumentParser):
    """argparse for one job: `python -m beam_jobs.NAME` usage, defaults and required flags marked
    in --help, a one-line error and exit 2 instead of argparse's usage dump."""

    def __init__(self, prog: str, description: Optional[str]) -> None:
        self.flags: list[str] = []  # before super(), which adds -h
        super().__init__(prog=prog, description=description, epilog=_BEAM_EPILOG,
                         allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        """argparse's add_argument, recording the flag names and marking required flags and
        non-empty defaults in the help text."""
        self.flags.extend(name for name in names if isinstance(name, str) and name.startswith("-"))
        if "help" in kwargs and kwargs["help"] not in (None, argparse.SUPPRESS):
            kwargs["help"] = _help_with_default(kwargs["help"], kwargs)
        return super().add_argument(*names, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit 2 (argparse's convention for a bad command line)."""
        fail_usage(f"{message} (see {self.prog} --help)")


def _help_with_default(text: str, kwargs: dict) -> str:
    """`text` plus ' (required)' or ' (default: X)' unless the text already says so."""
    if kwargs.get("required"):
        return text if "required" in text.lower() else f"{text} (required)"
    default = kwargs.get("default")
    empty = default is None or default is False or default is argparse.SUPPRESS or (
        isinstance(default, (str, list, tuple)) and not default)
    if empty or "default" in text.lower():
        return text
    return f"{text} (default: %(default)s)"


def fail_usage(message: str) -> NoReturn:
    """End the program as a bad command line does: `error: message` on stderr, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def job_prog(options_class: type) -> str:
    """'python -m beam_jobs.NAME' for the module that defines `options_class`."""
    module = options_class.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else os.path.basename(sys.argv[0])
    return f"python -m {module}"


def split_job_flags(options_class: type, argv: Optional[Sequence[str]] = None,
                    description: Optional[str] = None) -> tuple[Any, Any]:
    """(the job's options, PipelineOptions of the remaining flags) for `argv` (default sys.argv).

    `--help` prints the job's flags (with `description`) and exits 0. Beam/Dataflow flags
    (--runner, --project, --direct_num_workers, ...) pass through to the PipelineOptions; a
    missing required flag, a bad value, or a flag nobody defines ends the program with one line
    on stderr and exit 2 (see `JobArgumentParser.error`).
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = JobArgumentParser(job_prog(options_class), description)
    options_class._add_argparse_args(parser)  # pylint: disable=protected-access
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help="show tracebacks of user errors and third-party (Beam, Google) logs")
    check_beam_flags(_unparsed_flags(parser, argv), parser.flags)  # a typo first, then the rest
    values, rest = parser.parse_known_args(argv)
    if values.verbose:
        show_third_party_logs()
    pipeline_options = PipelineOptions(rest)
    return options_class(values, pipeline_options), pipeline_options


def _unparsed_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """What the job's parser leaves to Beam, without enforcing required flags (so that a
    misspelled required flag is reported as the typo it is, with its hint). With --help: nothing
    (the real parse prints the help, required flags marked)."""
    if "-h" in argv or "--help" in argv:
        return []
    required = [action for action in parser._actions if action.required]  # pylint: disable=protected-access
    for action in required:
        action.required = False
    try:
        return parser.parse_known_args(argv)[1]
    finally:
        for action in required:
            action.required = True


def check_beam_flags(flags: Sequence[str], job_flags: Sequence[str] = ()) -> None:
    """Exit 2 with a hint unless every item of `flags` is a Beam/Dataflow flag or its value."""
    beam_parser, beam_flags = beam_flag_parser()
    try:
        _, unknown = beam_parser.parse_known_args(list(flags))
    except argparse.ArgumentError as error:  # a bad value, e.g. --direct_num_workers=x
        fail_usage(str(error))
    names = [item.split("=", 1)[0] for item in unknown if item.startswith("-")]
    if names:
        known = [*job_flags, *beam_flags]
        fail_usage("; ".join(_unknown_flag_message(name, known) for name in names))
    if unknown:
        fail_usage(f"unexpected argument {unknown[0]!r} (flags are --name=value)")


def _unknown_flag_message(name: str, known: Sequence[str]) -> str:
    """'unknown flag --licence (did you mean --licenses?)'."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"unknown flag {name}" + (f" (did you mean {close[0]}?)" if close else "")


def beam_flag_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """Beam's full parser (the flags of every registered PipelineOptions class, raising
    argparse.ArgumentError on a bad value) and the names of its flags.

    `PipelineOptions.get_all_options(add_extra_args_fn=...)` hands its callback the parser after
    every options class has added its flags; the option names are the keys it returns.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    captured: list[argparse.ArgumentParser] = []

    def capture(parser: argparse.ArgumentParser) -> None:
        parser.exit_on_error = False
        captured.append(parser)

    all_options = PipelineOptions([]).get_all_options(add_extra_args_fn=capture)
    return captured[0], [f"--{name}" for name in all_options]


# ---- errors --------------------------------------------------------------------------------------

def run_main(run_fn: Callable[[list[str]], Any], argv: Optional[Sequence[str]] = None,
             exit_code: Callable[[Any], int] = lambda result: 0) -> NoReturn:
    """Run a job's `run_fn(argv)` as the program and exit: `exit_code(result)` on success, 2 with
    one line for a user error, 130 with one line on Ctrl-C; anything else keeps its traceback.

    `--verbose` in argv prints the traceback of user errors too and shows third-party logs.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE_FLAG in argv
    with job_logging(verbose):
        try:
            result = run_fn(argv)
        except (Exception, KeyboardInterrupt) as error:  # pylint: disable=broad-except
            raise SystemExit(_report_failure(error, verbose)) from None
    raise SystemExit(exit_code(result))


def _report_failure(error: BaseException, verbose: bool) -> int:
    """Print how `error` ended the job; return the exit code (re-raise what is not ours)."""
    if any(isinstance(link, KeyboardInterrupt) for link in _chain(error)):
        if verbose:
            traceback.print_exception(error)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not is_user_error(error):
        raise error
    if verbose:
        traceback.print_exception(error)
    print(f"error: {one_line(error)}", file=sys.stderr)
    return EXIT_USAGE


def is_user_error(error: BaseException) -> bool:
    """A UsageError anywhere, or a LAUNCH_USER_ERRORS raised before any element was processed."""
    if isinstance(error, UsageError):
        return True
    return isinstance(error, LAUNCH_USER_ERRORS) and not _raised_in_element_processing(error)


def one_line(error: BaseException) -> str:
    """The error's message on one line (its class name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or while handling."""
    seen: set[int] = set()
    link: Optional[BaseException] = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _raised_in_element_processing(error: BaseException) -> bool:
    """True when a frame of Beam's element-processing machinery is in the error's traceback."""
    frame_tb = error.__traceback__
    while frame_tb is not None:
        module = frame_tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith(_ELEMENT_PROCESSING_MODULES):
            return True
        frame_tb = frame_tb.tb_next
    return False


# ---- logs ----------------------------------------------------------------------------------------

class _ProjectRecordsOnly(logging.Filter):
    """Keeps records logged by the project's packages and CRITICAL records from anyone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.CRITICAL
                or os.path.abspath(record.pathname).startswith(_PROJECT_PACKAGES))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (as logging.lastResort)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)  # pylint: disable=non-parent-init-called

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_HANDLER: Optional[logging.Handler] = None
_FILTER = _ProjectRecordsOnly()


def configure_logging(verbose: bool) -> None:
    """Log to stderr in basicConfig's format; hide third-party records unless `verbose`.

    Called when a job starts (beam_jobs/__init__.py, before Beam is imported, and `run_main`);
    library use (tests, notebooks) never reaches it.
    """
    global _HANDLER  # pylint: disable=global-statement
    root = logging.getLogger()
    if _HANDLER is None:
        _HANDLER = _StderrHandler()
        _HANDLER.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
        root.addHandler(_HANDLER)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    if verbose:
        root.setLevel(logging.INFO)
        _HANDLER.removeFilter(_FILTER)
    else:
        _HANDLER.addFilter(_FILTER)


@contextlib.contextmanager
def job_logging(verbose: bool) -> Iterator[None]:
    """`configure_logging(verbose)` for the duration of a job, then the logging setup as it was
    (a job's main() called in-process, e.g. by a test, leaves no handler behind)."""
    global _HANDLER  # pylint: disable=global-statement
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, _HANDLER,
             list(_HANDLER.filters) if _HANDLER is not None else [])
    configure_logging(verbose)
    try:
        yield
    finally:
        root.handlers[:], _HANDLER = saved[0], saved[2]
        root.setLevel(saved[1])
        if _HANDLER is not None:
            _HANDLER.filters[:] = saved[3]


def show_third_party_logs() -> None:
    """Stop hiding third-party records (--verbose, remote runners whose progress Beam logs)."""
    if _HANDLER is not None:
        _HANDLER.removeFilter(_FILTER)


def launched_as_job() -> bool:
    """True while `python -m beam_jobs.NAME` imports the beam_jobs package: Python sets
    sys.argv[0] to '-m' while it locates the module to run (documented for -m)."""
    return sys.argv[:1] == ["-m"]
