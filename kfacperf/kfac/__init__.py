"""The K-FAC / SP-NGD optimizer: layers and factors, inverses, preconditioner, strategies."""
