import sys

try:
    from gpumesh.mesh.cli import main
except KeyboardInterrupt:      # Ctrl-C while Python is still importing: nothing started yet
    sys.exit(130)

sys.exit(main())
