//! `POST /v1/admin-users` and `GET /v1/admin-users` (admin): the people who may sign in
//! to the admin UI with a name and a password.
//!
//! Creating one is what the first-start setup link of the admin UI does with the
//! bootstrap admin token, so the first user needs no shell on the host. The rules, the
//! hashing and the `admin_user.created` record are the domain's (`crate::admin_users`),
//! the same as for `gatehouse admin-user add`. No answer carries a password or its hash.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::extract::{Admin, ApiJson};
use crate::admin_users::AdminUserInfo;

/// This resource's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/admin-users", get(list).post(create))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewUser {
    username: String,
    password: String,
}

/// A user as the API shows it: named `username` as in the bodies that take one
/// (`POST /v1/admin-users`, `POST /v1/session`).
#[derive(Debug, Serialize)]
pub(crate) struct UserView {
    username: String,
    created_at: String,
    password_changed_at: String,
}

impl From<AdminUserInfo> for UserView {
    fn from(user: AdminUserInfo) -> Self {
        Self {
            username: user.name,
            created_at: user.created_at,
            password_changed_at: user.password_changed_at,
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct UserList {
    users: Vec<UserView>,
}

/// `POST /v1/admin-users` `{"username", "password"}`: 201 with the new user; 409 if the
/// name is taken; 400 for a name or password the rules refuse.
async fn create(
    State(state): State<AppState>,
    admin: Admin,
    ApiJson(request): ApiJson<NewUser>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let user = state
        .services
        .admin_users
        .add(&request.username, &request.password, &admin.origin)
        .await?;
    Ok((StatusCode::CREATED, Json(user.into())))
}

/// `GET /v1/admin-users`: every admin user, by name.
async fn list(State(state): State<AppState>, _admin: Admin) -> Result<Json<UserList>, ApiError> {
    let users = state.services.admin_users.list()?;
    Ok(Json(UserList {
        users: users.into_iter().map(UserView::from).collect(),
    }))
}
