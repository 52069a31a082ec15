"""From a checkpoint to a shipped bundle: export (`export`), the flags' thresholds and blend detector (`flags`,
`blend`), the temperature and PIT calibrations (`temperature`, `pit_calibration`), the model card (`model_card`)
and the whole release in one command (`ship`: ``photoz ship``)."""
