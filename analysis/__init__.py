"""analysis: neural-collapse metrics, Neural Feature Ansatz correlations and collapse curves."""
