// A Go caller built on the client buf.gen.yaml generates: registers a
// workspace and reads its decision back, and reads an error's ErrorInfo.
// `.ci/go-client` builds it and runs it against the real server:
//
//	go-caller ADDRESS
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	billingv1 "github.com/molecule-ai/billing-mode/gen/go/molecule/billing/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go-caller: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, os.Args[1], grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fail("dial: %v", err)
	}
	defer conn.Close()
	client := billingv1.NewBillingModeClient(conn)
	const workspace = "6b66de8d-9337-4fb4-be8d-6d49dca0d809"

	// Not registered yet: NOT_FOUND, with the reason in an ErrorInfo.
	_, err = client.Resolve(ctx, &billingv1.ResolveRequest{WorkspaceId: workspace})
	st, _ := status.FromError(err)
	if st.Code() != codes.NotFound {
		fail("Resolve of an unregistered workspace: want NotFound, got %v", err)
	}
	reason := ""
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && info.Domain == "billing-mode.molecule" {
			reason = info.Reason
		}
	}
	if reason != "WORKSPACE_NOT_FOUND" {
		fail("want ErrorInfo reason WORKSPACE_NOT_FOUND, got %q (details %v)", reason, st.Details())
	}

	runtime, model := "claude-code", "opus"
	_, err = client.Set(ctx, &billingv1.SetRequest{
		WorkspaceId:    workspace,
		Runtime:        &runtime,
		Model:          &model,
		CredentialKeys: &billingv1.CredentialKeys{Keys: []string{"CLAUDE_CODE_OAUTH_TOKEN"}},
		Reason:         "register",
	})
	if err != nil {
		fail("Set: %v", err)
	}
	res, err := client.Resolve(ctx, &billingv1.ResolveRequest{WorkspaceId: workspace})
	if err != nil {
		fail("Resolve: %v", err)
	}
	if res.GetResolution().GetMode() != billingv1.Mode_MODE_BYOK {
		fail("want MODE_BYOK, got %v", res.GetResolution().GetMode())
	}
	fmt.Println("go-caller: NOT_FOUND with ErrorInfo WORKSPACE_NOT_FOUND, then Set and Resolve: MODE_BYOK")
}
