import sys


def _interrupted(exc: BaseException) -> bool:
    # A Ctrl-C inside class creation reaches us wrapped: Python turns an exception raised
    # by __set_name__ (dataclass fields) into "RuntimeError: Error calling __set_name__",
    # with the KeyboardInterrupt as its cause.
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


try:
    from gpumesh.interrupts import remember_interrupts
    remember_interrupts()        # main() asks whether a Ctrl-C came while the CLI imported
    from gpumesh.mesh.cli import main
except BaseException as exc:   # Ctrl-C while Python is still importing: nothing started yet
    if _interrupted(exc):
        sys.exit(130)
    raise

sys.exit(main())
