"""HTTP layer: Qiniu routes, wire format and signatures."""
