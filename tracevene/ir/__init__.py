"""The intervention-program IR: nodes, programs, serialisation."""
