"""Generated gRPC and protobuf code for protos/gosgd_p2p/v1 (do not edit; see gosgd_p2p.protogen)."""
