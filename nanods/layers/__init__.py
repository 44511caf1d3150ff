"""Building blocks: rope and norms here; attention/, ffn/ and routers/ hold the swappable components."""
