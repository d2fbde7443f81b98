"""The data plane: runs inside Ray workers. Imports torch and numpy only."""
