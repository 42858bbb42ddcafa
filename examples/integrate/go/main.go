// A small net/http app whose routes need a gatehouse device token.
//
// Run: AUTH_ISSUER=https://auth.example.com ./gatehouse-example   (PORT, default 8000;
// 0 picks a free port). It prints "listening on http://127.0.0.1:PORT" once it accepts
// requests.
package main

import (
	"encoding/json"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
)

func whoami(w http.ResponseWriter, r *http.Request) {
	device, _ := DeviceFrom(r.Context())
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"device_id": device.ID, "token_id": device.TokenID, "expires_at": device.ExpiresAt,
	})
}

// notes: authorization is the app's own; a device reads only its own notes (else 403).
func notes(w http.ResponseWriter, r *http.Request) {
	device, _ := DeviceFrom(r.Context())
	id, rest, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/devices/"), "/")
	if rest != "notes" {
		http.NotFound(w, r)
		return
	}
	if id != device.ID {
		writeJSON(w, http.StatusForbidden, "a device may read only its own notes")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"device_id": id, "notes": []string{}})
}

func main() {
	log.SetFlags(0)
	cfg, err := ConfigFromEnv()
	if err != nil {
		log.Fatal(err)
	}
	verifier, err := NewVerifier(cfg)
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	// Offline check: fast, but a revoked token still passes until it expires.
	mux.Handle("/me", verifier.RequireDevice(http.HandlerFunc(whoami)))
	// Introspection: a revoked token, family, device or key is refused at once.
	mux.Handle("/me/live", verifier.RequireLiveDevice(http.HandlerFunc(whoami)))
	mux.Handle("/devices/", verifier.RequireDevice(http.HandlerFunc(notes)))

	port := os.Getenv("PORT")
	if port == "" {
		port = "8000"
	}
	listener, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", port))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening on http://%s\n", listener.Addr())
	log.Fatal(http.Serve(listener, mux))
}
