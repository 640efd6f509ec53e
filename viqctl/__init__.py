"""viqctl: the command line of viq. Parses, prints and sets exit codes; viq computes."""
