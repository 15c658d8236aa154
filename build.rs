//! Compiles `proto/` into Rust with a pure-Rust protobuf compiler (protox), so a machine with only
//! cargo builds the project: no protoc, no system packages.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/miniapp/broker/v1/api.proto",
    "proto/miniapp/broker/v1/renderer.proto",
    "proto/miniapp/broker/v1/host.proto",
    "proto/miniapp/broker/v1/exchange.proto",
    "proto/miniapp/broker/v1/admin.proto",
    "proto/miniapp/platform/v1/platform.proto",
];

/// Per-API messages that the JSON bridge reads and writes with the WeChat camelCase names.
const JSON_MESSAGES: &[&str] = &[
    "LoginRequest",
    "LoginResponse",
    "CheckSessionRequest",
    "CheckSessionResponse",
    "GetPhoneNumberRequest",
    "GetPhoneNumberResponse",
    "GetEmailRequest",
    "GetEmailResponse",
    "ChooseAvatarRequest",
    "ChooseAvatarResponse",
    "GetNickNameRequest",
    "GetNickNameResponse",
    "UserInfo",
    "GetUserInfoRequest",
    "GetUserInfoResponse",
    "GetUserProfileRequest",
    "GetUserProfileResponse",
    "RequestPaymentRequest",
    "RequestPaymentResponse",
    "RequestMidasPaymentGameItemRequest",
    "RequestMidasPaymentGameItemResponse",
    "HostError",
    "GetSettingRequest",
    "GetSettingResponse",
    "AuthorizeRequest",
    "AuthorizeResponse",
    "OpenSettingRequest",
    "OpenSettingResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Served by gRPC reflection, so grpcurl and friends can list and call the daemon.
    fs::write(out.join("miniapp_broker_v1_descriptor.bin"), fds.encode_to_vec())?;

    // No `connect(endpoint)` constructors: clients reach the daemon over local sockets through
    // their own connector, and the constructor would collide with the `Host.Connect` RPC.
    // Prost with buffers sized for this protocol (src/codec.rs), instead of tonic's 8 KiB ones.
    let mut builder = tonic_prost_build::configure().build_transport(false).codec_path("crate::codec::ProstCodec");
    for name in JSON_MESSAGES {
        builder = builder.type_attribute(
            format!(".miniapp.broker.v1.{name}"),
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"camelCase\", default)]",
        );
    }
    for field in ["GetUserInfoResponse.user_info", "GetUserProfileResponse.user_info"] {
        builder = builder.field_attribute(
            format!(".miniapp.broker.v1.{field}"),
            "#[serde(skip_serializing_if = \"Option::is_none\")]",
        );
    }
    // The user's decisions, in a stable order (scope names sort the same everywhere).
    for field in
        ["GetSettingResponse.auth_setting", "OpenSettingRequest.auth_setting", "OpenSettingResponse.auth_setting"]
    {
        builder = builder.btree_map(format!(".miniapp.broker.v1.{field}"));
    }
    builder.compile_fds(fds)?;
    Ok(())
}
