"""The data plane: executes the control plane's step plans on a device and reports facts."""
