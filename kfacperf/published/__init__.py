"""Published GPU measurements as data (``published/*.toml``), and their prediction from the
setup each states.  Validation compares (:mod:`kfacperf.validation.published`); calibration
fits the calibration set (:mod:`kfacperf.calibrate.published`).  Never imports torch."""
