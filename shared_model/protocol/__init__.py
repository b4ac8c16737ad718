"""What crosses between server and devices (pure numpy and cryptography: no torch, no Flower): the update codec
(``updates``), the per-update clips (``clipping``), the vector a device adds to a SecAgg+ sum
(``secagg_vector``) and the signed on-device bundle (``bundle``, with the device errors it raises in
``errors``)."""
