"""Built-in MoE methods; importing this package registers them (one module per scheme family)."""

from moequant.methods import fp4, fp8, intq, unquantized  # noqa: F401
from moequant.methods.base import FusedMoEMethodBase, LoadSpec, MoEGeometry, set_load_spec  # noqa: F401
