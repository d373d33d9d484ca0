"""sdstack: Stable Diffusion 1.x from Python and the shell, text side done right.

Data flow: ``prompt`` (pure text) -> ``text`` (CLIP conditioning) -> ``generate``
(denoising, infotext); ``models`` (loading, key maps, hashes) beside it.
"""

__version__ = "0.1.0"
