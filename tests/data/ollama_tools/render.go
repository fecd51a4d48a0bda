// Renders cases.json through template.gotmpl with Go's text/template, the way Ollama executes a Modelfile
// TEMPLATE for /api/chat (fields System, Messages, Tools; a `json` function; system messages collated into
// .System). Writes renders.json, which tests/unit/test_export_gguf.py compares with the Hugging Face
// rendering of the same conversations. Run after changing the template: go run render.go > renders.json
// (or, for other files: go run render.go TEMPLATE CASES > RENDERS; tests/data/ollama_turns uses it so)
package main

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type toolCallFunction struct {
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}

type toolCall struct {
	Function toolCallFunction `json:"function"`
}

type message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	ToolCalls []toolCall `json:"tool_calls,omitempty"`
}

type tool struct {
	Type     string         `json:"type"`
	Function map[string]any `json:"function"`
}

type testCase struct {
	Name     string    `json:"name"`
	Tools    string    `json:"tools"`
	Messages []message `json:"messages"`
}

func main() {
	templatePath, casesPath := "template.gotmpl", "cases.json"
	if len(os.Args) == 3 {
		templatePath, casesPath = os.Args[1], os.Args[2]
	}
	raw, err := os.ReadFile(templatePath)
	check(err)
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(template.FuncMap{
		"json": func(v any) string { b, _ := json.Marshal(v); return string(b) },
	}).Parse(string(raw)))
	var input struct {
		Toolsets map[string][]tool `json:"toolsets"`
		Cases    []testCase        `json:"cases"`
	}
	data, err := os.ReadFile(casesPath)
	check(err)
	check(json.Unmarshal(data, &input))
	renders := map[string]string{}
	for _, c := range input.Cases {
		var system []string
		for _, m := range c.Messages {
			if m.Role == "system" {
				system = append(system, m.Content)
			}
		}
		var out strings.Builder
		check(tmpl.Execute(&out, map[string]any{
			"System": strings.Join(system, "\n\n"), "Messages": c.Messages, "Tools": input.Toolsets[c.Tools], "Response": "",
		}))
		renders[c.Name] = out.String()
	}
	result, err := json.MarshalIndent(map[string]any{
		"template_sha256": fmt.Sprintf("%x", sha256.Sum256(raw)), "renders": renders,
	}, "", " ")
	check(err)
	fmt.Println(string(result))
}

func check(err error) {
	if err != nil {
		panic(err)
	}
}
