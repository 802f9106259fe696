"""How an engine runs: as a guarded process group on this node, or in a container.

A backend says *what* runs (`LaunchSpec`: argv, env, image, mounts); a runtime says *how*:
`process.ProcessRuntime` (the default) or `container.ContainerRuntime` (when the spec names
an image). Both hand back an `EngineHandle`, which is all the instance supervisor sees.

This package's `__init__` stays empty of imports: the guard (`guard.py`) is started as
`python -m gpumesh.mesh.runtimes.guard` beside every engine and must start fast.
"""
