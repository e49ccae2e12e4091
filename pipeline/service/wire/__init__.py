"""Generated gRPC stubs of schemas/speech_service.proto (regenerate with `make proto`; do not edit)."""
