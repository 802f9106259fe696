import sys

from gpumesh.mesh.cli import main

sys.exit(main())
