"""The checks llmc-parity ships for a user's own code. Its pytest plugin collects them
whenever ``--llmc-impl`` (a kernel port) or ``--llmc-model`` (a PyTorch model) is given, in
any repository, beside the user's own tests: nothing has to be copied. Test ids carry the
op's name, so ``-k layernorm`` selects as it does in llmc-parity's own suite."""
