"""The parts of per-plan calibration (:mod:`kvroute.calibrate` is the public entry point).

- :mod:`.maps`: the maps a routed model holds, per plan (attach, remove, query);
- :mod:`.fit`: calibration data, activation capture, the closed-form fit and the refinement;
- :mod:`.store`: the calibration file beside a checkpoint, and the checks that it fits the model.
"""
