"""The cost model: compute stages on a device model and collectives over a cluster model."""
